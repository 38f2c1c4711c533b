"""What a sweep found, at the sweep root: summary.csv, summary.md and plots.

A Hydra callback (hydra.callbacks in pipeline/conf/config.yaml), so it runs after the
jobs with any launcher. It reads each job's .hydra/overrides.yaml and
report.json; a job that failed (or left no report) is a row with its status and
error, so nothing a sweep learned is lost.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hydra.experimental.callback import Callback

from .plots import plot

BASE_COLUMNS = [
    "job",
    "overrides",
    "status",
    "error",
    "load_seconds",
    "reused_load_from",
    "quantized",
    "perplexity",
    "reference_perplexity",
    "heldout_perplexity",
    "reference_heldout_perplexity",
    "logits_rel_error",
    "method",
]


# What the last sweep of this process came to: its root and how many jobs were not ok (the CLI's exit code).
outcome: dict = {"root": None, "failed": 0}


class SweepSummary(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        """Pin the sweep root: every job composes hydra.sweep.dir again from its own overrides, so a swept
        checkpoint.path (which names runs/<name>/) would scatter the jobs away from the root the summary reads."""
        from omegaconf import open_dict

        root = str(config.hydra.sweep.dir)
        overrides = config.hydra.overrides.hydra
        if not any(str(o).startswith("hydra.sweep.dir=") for o in overrides):
            with open_dict(config):
                overrides.append("hydra.sweep.dir=" + _quoted(root))
                config.hydra.sweep.dir = root
        outcome.update(root=root, failed=0)

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        summarize(root)


def summarize(root: Path) -> list[dict]:
    """Write the summary of the jobs under `root` so far and note how many did not end ok."""
    rows = collect_rows(root)
    outcome.update(root=str(root), failed=sum(r.get("status") != "ok" for r in rows))
    if rows:
        plots = write_summary(root, rows)
        print(f"sweep summary: {root / 'summary.csv'}, {root / 'summary.md'}{_plots_said(root, plots)}")
    return rows


def _plots_said(root: Path, plots: list[Path] | None) -> str:
    """What the summary line says of plots: only what was written."""
    if plots is None:
        return "; no plots: matplotlib is not installed (pip install matplotlib)"
    if not plots:
        return "; no plots: no key took more than one value"
    return f" and {len(plots)} plot(s) in {root}"


def _quoted(value: str) -> str:
    """A Hydra override value that stays one string whatever the path holds (commas, spaces, quotes)."""
    import re

    doubled = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)  # backslashes before a quote or the end
    return "'" + doubled.replace("'", "\\'") + "'"


def _parse_overrides(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key.lstrip("+~")] = value
    return out


def collect_rows(root: Path) -> list[dict]:
    from omegaconf import OmegaConf

    rows = []
    jobs = sorted(
        (d for d in root.iterdir() if d.is_dir() and (d / ".hydra" / "overrides.yaml").exists()),
        key=lambda d: (len(d.name), d.name),
    )
    for job in jobs:
        overrides = [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
        row = {"job": job.name, "overrides": " ".join(overrides), "_swept": _parse_overrides(overrides)}
        report_path = job / "report.json"
        if not report_path.exists():
            row.update(status="error", error="the job left no report.json (it failed before the pipeline ran)")
            rows.append(row)
            continue
        r = json.loads(report_path.read_text())
        v = r.get("validation") or {}
        m = v.get("metrics") or {}
        row.update(
            status=r["status"],
            error=r.get("error") or "",
            load_seconds=(r.get("load") or {}).get("seconds"),
            quantized=(r.get("quantization") or {}).get("quantized"),
            reused_load_from=Path((r.get("quantization") or {}).get("reused_from") or "").name,
            perplexity=m.get("perplexity"),
            reference_perplexity=m.get("reference_perplexity"),
            heldout_perplexity=m.get("heldout_perplexity"),
            reference_heldout_perplexity=m.get("reference_heldout_perplexity"),
            logits_rel_error=m.get("logits_rel_error"),
            method="auto" if r.get("auto") else (r.get("quantization") or {}).get("method"),
        )
        sizes = v.get("measured_bytes") or ((r.get("plan") or {}).get("predicted_bytes") or {})
        for dev, n in sizes.items():
            row[f"bytes_{dev}"] = n
        rows.append(row)
    return rows


def write_summary(root: Path, rows: list[dict]) -> list[Path] | None:
    """summary.csv, summary.md and the plots; the plots written, None when matplotlib is not installed."""
    swept = swept_keys(rows)
    devices = sorted({k for r in rows for k in r if k.startswith("bytes_")})
    columns = BASE_COLUMNS[:2] + swept + BASE_COLUMNS[2:] + devices
    table = [{c: _value(r, c) for c in columns} for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    _atomic(root / "summary.csv", buf.getvalue())
    md = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    md += ["| " + " | ".join(_md(row[c]) for c in columns) + " |" for row in table]
    _atomic(root / "summary.md", "\n".join(md) + "\n")
    try:
        import matplotlib  # noqa: F401  (an optional dependency: the `sweep` extra)
    except ImportError:
        return None
    return plot(root, rows, swept, devices)


def swept_keys(rows: list[dict]) -> list[str]:
    keys = sorted({k for r in rows for k in r["_swept"]})
    return [k for k in keys if len({r["_swept"].get(k) for r in rows}) > 1]


def _value(row, column):
    if column in row:
        return row[column]
    return row["_swept"].get(column, "")


def _md(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _atomic(path: Path, text: str) -> None:
    from ..engine.artifacts import write_text

    write_text(path, text)
