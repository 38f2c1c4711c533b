"""Whole-process benchmark: from the command to a ready model, ours against a transformers script.

What a user waits for is the whole command (interpreter start, imports, CUDA init,
config, load, checks), so every method here is a fresh process timed from the
outside: wall time (perf_counter around the child), peak RSS and CPU seconds from
the child's own rusage (os.wait4). Methods alternate within each round (the order
rotates), and the "import floor" runs in the same rounds: a process that only
imports what a load needs (torch + CUDA init + the model class, bitsandbytes when
quantizing, Hydra) and does nothing else. Medians and ratios are printed as a
table; every sample goes to --out as JSON.

Suites (--suite):
  cpu-default  the default job (`python -m pipeline`: SmolLM2 int8, every check and
               metric), first run (an empty metric cache each time) and repeated
               (the cache kept), against the floor with bitsandbytes
  cpu-fp32     a Llama-shaped fp32 checkpoint on the CPU (--shape llama-400m, 1.6 GB):
               ours with validate's checks against from_pretrained + one forward
  cpu-dry70b   the 70B-shaped dry run (sparse shards: headers only)
  gpu          bf16 / int8 / nf4 on one GPU against transformers' from_pretrained(device_map="cuda")
               + one forward; warm and (--cold) dropped page cache; bytecode cache warm
               (PYTHONPYCACHEPREFIX kept) and (--cold-pyc) empty

    python bench/whole_process.py --suite cpu-default --rounds 5 --out bench/results/cpu_default.json
    python bench/whole_process.py --suite gpu --dir /tmp/llama7b --rounds 2 --cold --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

    if device == "cuda":
        kw = {"dtype": torch.bfloat16, "device_map": "cuda"}
        if quant == "int8":
            kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        elif quant == "nf4":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
    else:
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
    start = time.perf_counter()
    proc = _Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"method": name, "error": f"timed out after {timeout}s"}
    wall = time.perf_counter() - start
    sample = {"method": name, "wall_s": round(wall, 3), "rc": proc.returncode}
    usage = proc.usage
    if usage is not None:
        sample.update(peak_rss_mib=round(usage.ru_maxrss / 1024, 1), cpu_s=round(usage.ru_utime + usage.ru_stime, 3))
    if proc.returncode != 0:
        sample["error"] = out.decode(errors="replace").strip().splitlines()[-3:]
    if run_dir is not None and (run_dir / "report.json").exists():
        r = json.loads((run_dir / "report.json").read_text())
        sample["status"] = r["status"]
        sample["stages"] = {s["name"]: s["seconds"] for s in r["stages"]}
        sample["load_s"] = (r.get("load") or {}).get("seconds")
        sample["read_ahead"] = (r.get("load") or {}).get("page_cache")
        v = r.get("validation") or {}
        sample["checks_ok"] = all((v.get("checks") or {}).values()) if v else None
        sample["metric_costs"] = v.get("metric_costs")
        sample["metrics"] = {k: m for k, m in (v.get("metrics") or {}).items() if k != "forward_tokens_per_s"}
    return sample


class _Popen(subprocess.Popen):
    """Popen that reaps its child with wait4, keeping that child's own rusage (peak RSS, CPU seconds)."""

    usage = None

    def _try_wait(self, wait_flags):
        try:
            pid, sts, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return (self.pid, 0)
        if pid == self.pid:
            self.usage = usage
        return (pid, sts)


def drop_caches(paths=()) -> bool:
    """Empty the page cache: all of it where we may (root), else the checkpoint's shards only
    (posix_fadvise DONTNEED evicts a file's clean pages without privileges), checked with mincore."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        pass
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from pipeline.loading.page_cache import resident_fraction

    files = [f for p in paths for f in Path(p).glob("*.safetensors")]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return bool(files) and all(resident_fraction(str(f)) < 0.05 for f in files)


def warm(paths) -> None:
    for p in paths:
        for f in Path(p).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 * 2**20):
                    pass


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
            dict(name="hf_fp32", argv=me("--peer", a.dir, "--device", "cpu", "--quant", "none"), prime=True),
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
    for q in a.quant.split(","):
        out.append(dict(name=f"floor_{q}", argv=me("--floor", "cuda", "--quant", q)))
        over = [f"checkpoint.path={a.dir}", f"quantization={q}", "memory.max_memory={0: 120GiB}"]
        over += [f"hydra.run.dir={scratch}/ours_{q}", "quantization.unquantized_dtype=null", *NO_METRICS]
        over += a.ours_overrides.split()
        first = q == a.quant.split(",")[-1]  # ours with the last method primes the bytecode cache
        out.append(dict(name=f"ours_{q}", argv=ours(*over), run_dir=scratch / f"ours_{q}", prime=first))
        if a.alt_env or a.alt_overrides:  # the same run of ours under another setting (an A/B of one)
            alt = [o.replace(f"ours_{q}", f"ours_{q}_alt") for o in over] + a.alt_overrides.split()
            out.append(dict(name=f"ours_{q}_alt", argv=ours(*alt), env=_alt_env(a), run_dir=scratch / f"ours_{q}_alt"))
        out.append(dict(name=f"hf_{q}", argv=me("--peer", a.dir, "--device", "cuda", "--quant", q)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["cpu-default", "cpu-fp32", "cpu-dry70b", "gpu"])
    ap.add_argument("--dir", help="checkpoint directory (cpu-fp32, cpu-dry70b, gpu)")
    ap.add_argument("--quant", default="none", help="gpu: comma-separated of none,int8,nf4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also rounds with the page cache dropped before each run")
    ap.add_argument("--cold-pyc", action="store_true", help="also rounds with an empty bytecode cache")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm rounds (with --cold or --cold-pyc)")
    ap.add_argument("--budget", type=float, default=1e9, help="start no new run after this many seconds")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--ours-overrides", default="")
    ap.add_argument("--alt-env", default="", help="gpu, cpu-fp32: also ours_*_alt, run with these VAR=value settings")
    ap.add_argument(
        "--alt-overrides", default="", help="gpu, cpu-fp32: also ours_*_alt, run with these extra overrides"
    )
    ap.add_argument("--only", help="comma-separated method names to run (default: all of the suite)")
    ap.add_argument("--out")
    ap.add_argument("--floor", metavar="DEVICE", help=argparse.SUPPRESS)
    ap.add_argument("--peer", metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.floor:
        return floor(a.floor, a.quant != "none")
    if a.peer:
        return peer(a.peer, a.device, a.quant)
    drive(a)


def drive(a) -> None:
    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="whole_process_"))
    methods = methods_for(a, scratch)
    if a.only:
        methods = [m for m in methods if m["name"] in a.only.split(",")]
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    if a.suite == "gpu":  # the wheels there are installed without bytecode: keep it in one warm place
        base_env["PYTHONPYCACHEPREFIX"] = str(scratch / "pyc_warm")
    modes = [] if a.no_warm else [("warm", "warm_pyc")]
    if a.cold:
        modes.append(("cold", "warm_pyc"))
    if a.cold_pyc:
        modes.append(("warm", "cold_pyc"))
    for m in methods:  # fills the bytecode cache, and the metric cache of the "repeated" method
        if m.get("prime"):
            s = run_child(m["name"], m["argv"], {**base_env, **m.get("env", {})}, a.timeout, m.get("run_dir"))
            print(json.dumps({"prime": s}), flush=True)
    samples = []
    paths = [a.dir] if a.dir and a.suite != "cpu-dry70b" else []  # a dry run reads no tensor byte (sparse shards)
    for page, pyc in modes:
        for r in range(a.rounds):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]
            for m in order:
                if time.perf_counter() - t0 > a.budget:
                    break
                if m.get("setup"):
                    m["setup"]()
                env = {**base_env, **m.get("env", {})}
                if pyc == "cold_pyc":
                    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="pyc_cold_", dir=scratch)
                if page == "cold" and not drop_caches(paths):
                    print("cannot drop the page cache here: cold rounds skipped", flush=True)
                    break
                if page == "warm":
                    warm(paths)
                s = run_child(m["name"], m["argv"], env, a.timeout, m.get("run_dir"))
                s.update(page_cache=page, bytecode=pyc, round=r)
                samples.append(s)
                print(json.dumps(s), flush=True)
                if a.out:
                    Path(a.out).write_text(json.dumps({"env": environment(), "samples": samples}, indent=1))
    print(summarize(samples, [m["name"] for m in methods]))


def environment() -> dict:
    import platform

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out["loadavg_at_end"] = os.getloadavg()
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torch", "transformers", "accelerate", "safetensors", "bitsandbytes", "hydra-core"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def summarize(samples: list[dict], names: list[str]) -> str:
    lines = []
    for mode in sorted({(s["page_cache"], s["bytecode"]) for s in samples}):
        group = [s for s in samples if (s["page_cache"], s["bytecode"]) == mode and "wall_s" in s]
        med = {}
        for n in names:
            ok = [s for s in group if s["method"] == n and s.get("rc") == 0]
            if ok:
                med[n] = {k: statistics.median(s[k] for s in ok if k in s) for k in ("wall_s", "peak_rss_mib", "cpu_s")}
                med[n]["n"] = len(ok)
                loads = [s["load_s"] for s in ok if s.get("load_s") is not None]
                med[n]["load_s"] = statistics.median(loads) if loads else None
        lines.append(f"\npage cache {mode[0]}, bytecode {mode[1]}: medians")
        lines.append("| method | n | wall s | vs floor | CPU s | peak RSS MiB | load_shards load s |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for n, v in med.items():
            fl = _floor_for(n, med)
            vs = f"{v['wall_s'] - med[fl]['wall_s']:+.2f} s" if fl else "-"
            load = f"{v['load_s']:.3f}" if v["load_s"] is not None else "-"
            lines.append(
                f"| {n} | {v['n']} | {v['wall_s']:.2f} | {vs} | {v['cpu_s']:.2f} | {v['peak_rss_mib']:.0f} | {load} |"
            )
        for n in names:
            if n.startswith("ours_") and n.replace("ours_", "hf_") in med and n in med:
                hf = med[n.replace("ours_", "hf_")]["wall_s"]
                lines.append(f"{n}: {hf / med[n]['wall_s']:.2f}x the transformers script ({hf:.2f} s)")
        for s in group:
            if s.get("rc") != 0 or "error" in s:
                lines.append(f"error: {s['method']}: {s.get('error')}")
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
