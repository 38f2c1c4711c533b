"""Whole-process benchmark: from the command to a ready model, ours against a transformers script.

What a user waits for is the whole command (interpreter start, imports, CUDA init, config, load,
checks), so every method is a fresh process timed from the outside (bench/common.py). Methods
alternate within each round (the order rotates; with --cold, each round runs every method warm and
cold), and the "import floor" runs in the same rounds: a process that only imports what a load needs
(torch + CUDA init + the model class, bitsandbytes when quantizing, Hydra) and does nothing else.
"Cold" means the checkpoint's shards are dropped from the page cache before the process
(posix_fadvise DONTNEED, checked with mincore); the libraries stay cached, as on a machine that
loaded something else a minute ago. Medians and ratios are printed as a table; --out gets JSON lines
(the machine, every sample, the summary).

Suites (--suite):
  cpu-default  the default job (`python -m pipeline`: SmolLM2 int8, every check and
               metric), first run (an empty metric cache each time) and repeated
               (the cache kept), against the floor with bitsandbytes
  cpu-fp32     a Llama-shaped fp32 checkpoint on the CPU (--shape llama-400m, 1.6 GB):
               ours with validate's checks against from_pretrained + one forward
  cpu-dry70b   the 70B-shaped dry run (sparse shards: headers only)
  gpu          bf16 / int8 / nf4 (--quant) on --device (cuda: GPU 0; cpu to try it here) against
               transformers' from_pretrained(device_map=device) + one forward; warm and (--cold)
               shards dropped; bytecode cache warm (PYTHONPYCACHEPREFIX kept) and (--cold-pyc) empty

    python bench/whole_process.py --suite cpu-default --rounds 5 --out bench/results/cpu_default.jsonl
    python bench/whole_process.py --suite gpu --dir /tmp/llama7b --quant none,int8 --cold --out r.jsonl
(bench/gpu_rows.py runs the GPU rows of docs/benchmarks.md in one command.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, evict, rotations, shards, spread, timed, warm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
NO_METRICS = [
    "stages.validate.metrics.perplexity=false",
    "stages.validate.metrics.reference=false",
    "stages.validate.max_new_tokens=0",
    "stages.load_shards.progress=false",
]

# ---------------------------------------------------------------- what the child processes run


def floor(device: str, quant: bool) -> None:
    """Only what a load needs imported (and CUDA initialised): nothing is read."""
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401

    if device == "cuda":
        torch.empty(1, device="cuda")
    if quant:
        import bitsandbytes  # noqa: F401
    import hydra  # noqa: F401
    import omegaconf  # noqa: F401


def peer(ckpt: str, device: str, quant: str) -> None:
    """The transformers script: from_pretrained, then one forward on fixed tokens, then a finite check."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant != "auto":
        kw = {"dtype": torch.bfloat16, "device_map": device}
        if quant == "int8":
            kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        elif quant == "nf4":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
    else:  # the CPU suites: the checkpoint's own dtype
        kw = {"dtype": "auto"}
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kw)
    ids = (torch.arange(32) * 7 % model.config.vocab_size).unsqueeze(0).to(model.device)
    with torch.inference_mode():
        out = model(input_ids=ids).logits
    assert bool(torch.isfinite(out).all())
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- the driver


def run_child(name: str, argv: list[str], env: dict, timeout: float, run_dir: Path | None = None) -> dict:
    """One timed process; for ours, what its report.json says (status, stage seconds, load, checks)."""
    sample = {"method": name, **timed(argv, env=env, cwd=REPO, timeout=timeout)}
    if run_dir is not None and (run_dir / "report.json").exists():
        r = json.loads((run_dir / "report.json").read_text())
        sample["status"] = r["status"]
        sample["stages"] = {s["name"]: s["seconds"] for s in r["stages"]}
        load = r.get("load") or {}
        sample["load_s"] = load.get("seconds")
        sample["peak_gpu_bytes"] = load.get("peak_gpu_bytes")
        v = r.get("validation") or {}
        sample["checks_ok"] = all((v.get("checks") or {}).values()) if v else None
        sample["metric_costs"] = v.get("metric_costs")
        sample["metrics"] = {k: m for k, m in (v.get("metrics") or {}).items() if k != "forward_tokens_per_s"}
        (run_dir / "report.json").unlink()  # a run that writes none must not show this one's
    return sample


def me(*args: str) -> list[str]:
    return [PY, str(Path(__file__).resolve()), *args]


def ours(*overrides: str) -> list[str]:
    return [PY, "-m", "pipeline", *overrides]


def _alt_env(a) -> dict:
    """--alt-env's VAR=value settings as a dict (the environment of ours_*_alt)."""
    return dict(kv.split("=", 1) for kv in a.alt_env.split())


def methods_for(a, scratch: Path) -> list[dict]:
    """Each method: name, argv, extra env, optional run dir (report.json read back), setup(callable)."""
    if a.suite == "cpu-default":
        first_cache = scratch / "metrics_first"

        def empty_cache():
            shutil.rmtree(first_cache, ignore_errors=True)

        return [
            dict(name="floor_int8", argv=me("--floor", "cpu", "--quant", "int8"), prime=True),
            dict(
                name="ours_default_first",
                argv=ours(f"hydra.run.dir={scratch}/first"),
                env={"MODEL_LOADER_METRICS_CACHE": str(first_cache)},
                run_dir=scratch / "first",
                setup=empty_cache,
            ),
            dict(
                name="ours_default_repeated",
                argv=ours(f"hydra.run.dir={scratch}/repeated"),
                env={"MODEL_LOADER_METRICS_CACHE": str(scratch / "metrics_kept")},
                run_dir=scratch / "repeated",
                prime=True,
            ),
        ]
    if a.suite == "cpu-fp32":
        over = [f"checkpoint.path={a.dir}", "quantization=none", *NO_METRICS]
        out = [
            dict(name="floor", argv=me("--floor", "cpu", "--quant", "none")),
            dict(
                name="ours_fp32",
                argv=ours(*over, f"hydra.run.dir={scratch}/ours"),
                run_dir=scratch / "ours",
                prime=True,
            ),
            dict(name="hf_fp32", argv=me("--peer", a.dir, "--device", "cpu", "--quant", "auto"), prime=True),
        ]
        if a.alt_env or a.alt_overrides:  # the same run of ours under another setting (an A/B of one)
            alt = [*over, f"hydra.run.dir={scratch}/ours_alt", *a.alt_overrides.split()]
            out.insert(2, dict(name="ours_fp32_alt", argv=ours(*alt), env=_alt_env(a), run_dir=scratch / "ours_alt"))
        return out
    if a.suite == "cpu-dry70b":
        caps = "memory.max_memory={0:40GiB,1:40GiB,cpu:200GiB}"
        return [
            dict(
                name="ours_dry_run_70b",
                argv=ours(f"checkpoint.path={a.dir}", "+experiment=dry_run", caps, f"hydra.run.dir={scratch}/dry"),
                run_dir=scratch / "dry",
                prime=True,
            ),
            dict(name="floor_no_bnb", argv=me("--floor", "cpu", "--quant", "none")),
        ]
    out = []
    cap = "memory.max_memory={0: 60GiB}" if a.device == "cuda" else "memory.max_memory={cpu: 64GiB}"
    for q in a.quant.split(","):
        if a.floors:
            out.append(dict(name=f"floor_{q}", argv=me("--floor", a.device, "--quant", q)))
        over = [f"checkpoint.path={a.dir}", f"quantization={q}", cap, "dtype=bf16"]
        over += [f"hydra.run.dir={scratch}/ours_{q}", "quantization.unquantized_dtype=null", *NO_METRICS]
        over += a.ours_overrides.split()
        first = q == a.quant.split(",")[-1]  # ours and transformers with the last method prime the bytecode cache
        out.append(dict(name=f"ours_{q}", argv=ours(*over), run_dir=scratch / f"ours_{q}", prime=first))
        if a.alt_env or a.alt_overrides:  # the same run of ours under another setting (an A/B of one)
            alt = [o.replace(f"ours_{q}", f"ours_{q}_alt") for o in over] + a.alt_overrides.split()
            out.append(dict(name=f"ours_{q}_alt", argv=ours(*alt), env=_alt_env(a), run_dir=scratch / f"ours_{q}_alt"))
        out.append(dict(name=f"hf_{q}", argv=me("--peer", a.dir, "--device", a.device, "--quant", q), prime=first))
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["cpu-default", "cpu-fp32", "cpu-dry70b", "gpu"])
    ap.add_argument("--dir", help="checkpoint directory (cpu-fp32, cpu-dry70b, gpu)")
    ap.add_argument("--quant", default="none", help="gpu: comma-separated of none (bf16),int8,nf4")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="gpu suite: where the model goes")
    ap.add_argument("--no-floors", dest="floors", action="store_false", help="gpu: leave the import floors out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="each round also runs every method with the shards evicted")
    ap.add_argument("--cold-pyc", action="store_true", help="each round also runs every method with no bytecode cache")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm runs (with --cold or --cold-pyc)")
    ap.add_argument("--budget", type=float, default=1e9, help="start no new round after this many seconds")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--ours-overrides", default="")
    ap.add_argument("--alt-env", default="", help="gpu, cpu-fp32: also ours_*_alt, run with these VAR=value settings")
    ap.add_argument(
        "--alt-overrides", default="", help="gpu, cpu-fp32: also ours_*_alt, run with these extra overrides"
    )
    ap.add_argument("--only", help="comma-separated method names to run (default: all of the suite)")
    ap.add_argument("--out", help="JSON lines: the machine, every sample, the summary")
    ap.add_argument("--floor", metavar="DEVICE", help=argparse.SUPPRESS)
    ap.add_argument("--peer", metavar="CKPT", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    a = parser().parse_args()
    if a.floor:
        return floor(a.floor, a.quant not in ("none", "auto"))
    if a.peer:
        return peer(a.peer, a.device, a.quant)
    drive(a)


def drive(a, results: Results | None = None) -> dict:
    """Prime, then the rounds (every mode of every method once per round, order rotated); the summary."""
    t0 = time.perf_counter()
    results = results or Results(a.out)
    scratch = Path(tempfile.mkdtemp(prefix="whole_process_"))
    methods = methods_for(a, scratch)
    if a.only:
        methods = [m for m in methods if m["name"] in a.only.split(",")]
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    if a.suite == "gpu":  # the wheels there are installed without bytecode: keep it in one warm place
        base_env["PYTHONPYCACHEPREFIX"] = str(scratch / "pyc_warm")
        base_env.pop("PYTHONDONTWRITEBYTECODE", None)  # else the prefix stays empty and every run compiles
    modes = [] if a.no_warm else [("warm", "warm_pyc")]
    if a.cold:
        modes.append(("cold", "warm_pyc"))
    if a.cold_pyc:
        modes.append(("warm", "cold_pyc"))
    files = shards([a.dir]) if a.dir and a.suite != "cpu-dry70b" else []  # a dry run reads no tensor byte
    for m in methods:  # fills the bytecode cache, and the metric cache of the "repeated" method
        if m.get("prime"):
            warm(files)
            results.add({"prime": run_child(m["name"], m["argv"], {**base_env, **m.get("env", {})}, a.timeout)})
    samples = []
    cells = [(mode, m) for mode in modes for m in methods]
    last = 0.0
    for r, order in rotations(cells, a.rounds):
        if time.perf_counter() - t0 + last > a.budget:  # a whole round, or none: every cell keeps the same n
            break
        start = time.perf_counter()
        for (page, pyc), m in order:
            if m.get("setup"):
                m["setup"]()
            env = {**base_env, **m.get("env", {})}
            if pyc == "cold_pyc":
                env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="pyc_cold_", dir=scratch)
            if page == "cold":
                left = evict(files)
                if left > 0.05:
                    raise SystemExit(f"{left:.0%} of a shard stayed in the page cache: cold runs impossible here")
            else:
                warm(files)
            s = run_child(m["name"], m["argv"], env, a.timeout, m.get("run_dir"))
            s.update(page_cache=page, bytecode=pyc, round=r)
            samples.append(s)
            results.add(s)
        last = time.perf_counter() - start
    summary = summarize(samples, [m["name"] for m in methods])
    results.add({"summary": summary})
    print(table(summary))
    shutil.rmtree(scratch, ignore_errors=True)
    return summary


def summarize(samples: list[dict], names: list[str]) -> dict:
    """Per mode and method: wall, CPU, peak RSS and load seconds as median/min/max/n; ours against its
    floor (difference of medians) and against transformers (the peer's median over ours)."""
    out = {}
    for mode in sorted({(s["page_cache"], s["bytecode"]) for s in samples}):
        group = [s for s in samples if (s["page_cache"], s["bytecode"]) == mode]
        med = {}
        for n in names:
            ok = [s for s in group if s["method"] == n and s.get("rc") == 0]
            if ok:
                med[n] = {k: spread(s[k] for s in ok if s.get(k) is not None) for k in STATS}
        for n, v in med.items():
            fl = _floor_for(n, med)
            if fl:
                v["vs_floor_s"] = round(v["wall_s"]["median"] - med[fl]["wall_s"]["median"], 3)
            peer_name = n.removesuffix("_alt").replace("ours_", "hf_")
            if n.startswith("ours_") and peer_name in med:
                v["x_transformers"] = round(med[peer_name]["wall_s"]["median"] / v["wall_s"]["median"], 3)
        out[f"{mode[0]}/{mode[1]}"] = med
        out.setdefault("errors", []).extend(
            f"{s['method']}: {s.get('error')}" for s in group if s.get("rc") != 0 or "error" in s
        )
    return out


STATS = ("wall_s", "cpu_s", "peak_rss_mib", "load_s")


def table(summary: dict) -> str:
    lines = []
    for mode, med in summary.items():
        if mode == "errors":
            lines += [f"error: {e}" for e in med]
            continue
        lines += [
            f"\n{mode}: medians (min-max)",
            "| method | n | wall s | vs floor | x transformers | CPU s | peak RSS MiB | load s |",
        ]
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for n, v in med.items():
            w, load = v["wall_s"], v["load_s"]
            vs = f"{v['vs_floor_s']:+.2f} s" if "vs_floor_s" in v else "-"
            x = f"{v['x_transformers']:.2f}x" if "x_transformers" in v else "-"
            ld = f"{load['median']:.3f}" if load["n"] else "-"
            lines.append(
                f"| {n} | {w['n']} | {w['median']:.2f} ({w['min']:.2f}-{w['max']:.2f}) | {vs} | {x} | "
                f"{v['cpu_s']['median']:.2f} | {v['peak_rss_mib']['median']:.0f} | {ld} |"
            )
    return "\n".join(lines)


def _floor_for(name: str, med: dict) -> str | None:
    if name.startswith("floor"):
        return None
    q = name.removesuffix("_alt").rsplit("_", 1)[-1]
    for cand in (f"floor_{q}", "floor_int8" if "default" in name else "", "floor", "floor_no_bnb"):
        if cand in med:
            return cand
    return None


if __name__ == "__main__":
    main()
