"""report.json: its shape (DESIGN.md) and the short human summary the CLI prints."""

from __future__ import annotations

from ..sizes import format_bytes


def new_report() -> dict:
    return {
        "status": "running",
        "checkpoint": None,
        "stages": [],
        "plan": None,
        "load": None,
        "quantization": None,
        "validation": None,
        "error": None,
    }


def format_summary(report: dict, run_dir) -> str:
    """What the CLI prints: status, stage times, memory per device, load, quantization, checks and metrics."""
    lines = [f"run: {run_dir}  status: {report['status'].upper()}"]
    ck = report.get("checkpoint") or {}
    if ck:
        lines.append(f"checkpoint: {ck['path']} ({ck['files']} {ck['format']} files, {format_bytes(ck['bytes'])})")
    lines.append("stages: " + "  ".join(f"{s['name']} {s['status']} {s['seconds']:.2f}s" for s in report["stages"]))
    if report.get("plan"):
        lines += _memory_table(report["plan"], report.get("validation") or {})
    if report.get("parallel"):
        lines += _rank_table(report["parallel"])
    load = report.get("load")
    if load:
        lines.append(
            f"load: {load['seconds']:.2f} s, {format_bytes(load['bytes_read'])} read ({load['gb_per_s']:.2f} GB/s), "
            f"peak host anon {format_bytes(load['peak_host_anon_bytes'])} "
            f"(baseline {format_bytes(load['baseline_host_anon_bytes'])})"
        )
    quant = report.get("quantization")
    if quant and quant["method"] != "none":
        lines.append(_quantization_line(quant))
    if report.get("validation"):
        lines += _validation_lines(report["validation"])
    return "\n".join(lines)


def _memory_table(plan: dict, validation: dict) -> list[str]:
    measured = validation.get("measured_bytes", {})
    errors = validation.get("plan_error", {})
    rows = [("device", "cap", "predicted", "measured", "error")]
    for dev, pred in plan["predicted_bytes"].items():
        cap = plan["max_memory"].get(dev)
        rows.append(
            (
                dev,
                format_bytes(cap) if cap is not None else "-",
                format_bytes(pred),
                format_bytes(measured[dev]) if dev in measured else "-",
                f"{errors[dev]:+.3%}" if dev in errors else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]


def _rank_table(parallel: dict) -> list[str]:
    """Tensor parallel: every rank's predicted, measured and read bytes (the table above is rank 0's)."""
    lines = [f"tensor parallel: {parallel['world_size']} ranks ({parallel['backend']})"]
    rows = [("rank", "device", "predicted", "measured", "planned read", "read")]
    for r in parallel["ranks"]:
        measured, read = r.get("measured_bytes"), r.get("bytes_read")
        rows.append(
            (
                str(r["rank"]),
                r["device"],
                format_bytes(r["predicted_bytes"]),
                format_bytes(measured) if measured is not None else "-",
                format_bytes(r["read_bytes"]),
                format_bytes(read) if read is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    found = parallel.get("logits") or {}
    if found.get("max_abs_diff") is not None:
        lines.append(
            f"logits vs single process: max |diff| {found['max_abs_diff']:.3g} of max |logit| "
            f"{found['max_abs_reference']:.3g}" + (f" (tolerance {found['tolerance']:g})" if found["tolerance"] else "")
        )
    return lines


def _quantization_line(quant: dict) -> str:
    if quant["method"] == "int8":
        how = f"threshold {quant['threshold']}"
    else:
        how = f"compute {quant['compute_dtype']}, double quant {'on' if quant['double_quant'] else 'off'}"
    skipped = f": {', '.join(quant['skipped'][:4])}" if quant["skipped"] else ""
    return f"{quant['method']}: {quant['quantized']} layers quantized ({how}), {len(quant['skipped'])} skipped{skipped}"


def _validation_lines(val: dict) -> list[str]:
    checks = val["checks"]
    ok = sum(checks.values())
    failed = "; ".join(f"{k}: {v}" for k, v in val.get("failures", {}).items())
    lines = [f"validation: {ok}/{len(checks)} checks passed" + ("" if ok == len(checks) else f" — FAILED: {failed}")]
    skipped = val.get("skipped") or {}
    if skipped:
        lines.append("skipped: " + "; ".join(f"{k} ({why})" for k, why in skipped.items()))
    m = val.get("metrics", {})
    cached = {k for k, e in (val.get("metric_costs") or {}).items() if e.get("cached")}
    mark = {k: " (cached)" if k in cached else "" for k in ("perplexity", "heldout_perplexity", "reference", "greedy")}
    for name, text in (("perplexity", "evaluation"), ("heldout_perplexity", "held-out")):
        if name in m:
            ref = m.get(f"reference_{name}")
            ref_mark = mark["reference"] if "reference_dtype" in m else mark[name]  # unquantized: itself
            vs = f" (unquantized reference {ref:.3f}{ref_mark}, {m[name] / ref - 1:+.2%})" if ref else ""
            lines.append(f"perplexity: {m[name]:.3f}{mark[name]} on the {text} text{vs}")
    if m.get("logits_rel_error"):
        of = " (reference logits cached)" if "reference" in cached else ""
        lines.append(f"logits vs unquantized reference: relative error {m['logits_rel_error']:.4f}{of}")
    if "continuation" in m:
        lines.append(f"greedy: {m['prompt']!r} -> {m['continuation']!r}{mark['greedy']}")
    return lines
