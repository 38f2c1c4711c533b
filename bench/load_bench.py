"""Load-speed benchmark: this pipeline against transformers, accelerate and plain safetensors.

Builds a synthetic checkpoint of a real shape (Llama-2-7B bf16 by default; use
--shape llama-400m --dtype fp32 --device cpu on a CPU machine), then runs every
method in a fresh subprocess (clean memory figures), alternating the order each
round, warm and optionally cold (page cache dropped where the machine allows).
Prints a table of medians, GB/s and ratios, and writes all samples as JSON.

    python bench/load_bench.py --dir /tmp/llama7b --rounds 3 --out results.json
    python bench/load_bench.py --device cpu --shape llama-400m --dtype fp32 --dir /tmp/l400
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_METHODS = [
    "ours_bf16",
    "hf_bf16",
    "ours_int8",
    "hf_int8",
    "ours_nf4",
    "hf_nf4",
    "accelerate",
    "st_cuda",
    "st_cpu_to",
    "read_seq",
]
CPU_METHODS = ["ours_cpu", "hf_cpu"]


# ---------------------------------------------------------------- one measurement (in a subprocess)


def one(method: str, ckpt: str, device: str) -> dict:
    import torch

    from pipeline.measure.memory import PeakAnonSampler

    cuda = device == "cuda"
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")  # context creation is not part of any method
    if not method.startswith(("st_", "read_")):
        # Imports are not part of any method (on the GPU host they take 8-15 s for transformers'
        # model code and ~4 s for bitsandbytes, the same for every method that needs them).
        import transformers
        from transformers import LlamaForCausalLM  # noqa: F401

        transformers.AutoModelForCausalLM  # noqa: B018
        if "int8" in method or "nf4" in method:
            from pipeline.quant.bnb import import_bitsandbytes

            import_bitsandbytes()
            from transformers import BitsAndBytesConfig  # noqa: F401
        import accelerate  # noqa: F401

        import pipeline.api  # noqa: F401
        import pipeline.stages.instantiate_empty  # noqa: F401

    from pipeline import load

    extra = {}
    with PeakAnonSampler(0.002) as sampler:
        t0 = time.perf_counter()
        if method.startswith("ours"):
            q = method.removeprefix("ours_") if method in ("ours_int8", "ours_nf4") else "none"
            overrides = [
                f"checkpoint.path={ckpt}",
                f"quantization={q}",
                "stages.load_shards.progress=false",
                "stages.validate.metrics.perplexity=false",
                "stages.validate.metrics.reference=false",
                "stages.validate.max_new_tokens=0",
                f"hydra.run.dir={os.environ.get('BENCH_RUN_DIR', '/tmp/bench_run')}/{method}",
            ]
            overrides.append("memory.max_memory={0: 75GiB}" if cuda else "memory.max_memory={cpu: 64GiB}")
            # like transformers' BitsAndBytesConfig: what is not quantized stays in the load dtype (bf16)
            overrides.append("quantization.unquantized_dtype=null")
            overrides += os.environ.get("BENCH_OVERRIDES", "").split()
            r = load(overrides)
            model = r.model
            stages = {s["name"]: s["seconds"] for s in r.report["stages"]}
            extra = {
                "load_shards_s": stages["load_shards"],
                "plan_error": r.report["validation"]["plan_error"],
                "checks_ok": all(r.report["validation"]["checks"].values()),
            }
            seconds = sum(v for k, v in stages.items() if k != "validate")
        else:
            model = _peer(method, ckpt, device) if method != "read_seq" else _read_seq(ckpt)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        if not cuda:  # the CPU target: load plus one pass over every weight
            t1 = time.perf_counter()
            total = 0.0
            for p in model.parameters():
                total += float(p.float().sum()) if p.dtype != torch.int8 else 0.0
            extra["pass_s"] = time.perf_counter() - t1
            seconds += extra["pass_s"]
    nbytes = sum(os.path.getsize(f) for f in Path(ckpt).glob("*.safetensors"))
    out = {
        "method": method,
        "seconds": seconds,
        "gb_per_s": nbytes / seconds / 1e9,
        "peak_host_anon_above_baseline": sampler.peak - sampler.baseline,
        **extra,
    }
    if cuda:
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _peer(method: str, ckpt: str, device: str):
    import torch

    if method in ("hf_bf16", "hf_int8", "hf_nf4", "hf_cpu"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw = {"dtype": torch.bfloat16, "device_map": "cuda"}
        if method == "hf_int8":
            kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        if method == "hf_nf4":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
        if method == "hf_cpu":
            kw = {"dtype": "auto"}
        return AutoModelForCausalLM.from_pretrained(ckpt, **kw)
    if method == "accelerate":
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch
        from transformers import AutoConfig, AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt), dtype=torch.bfloat16)
        return load_checkpoint_and_dispatch(model, ckpt, device_map="auto", dtype=torch.bfloat16)
    from safetensors import safe_open

    tensors = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        if method == "st_cuda":
            with safe_open(str(f), "pt", device="cuda") as fh:
                tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
        else:
            with safe_open(str(f), "pt", device="cpu") as fh:
                tensors.update({k: fh.get_tensor(k).to("cuda") for k in fh.keys()})
    return _Holder(tensors)


def _read_seq(ckpt: str):
    """One thread reading every shard front to back: the disk's (or page cache's) plain speed."""
    buf = bytearray(64 * 2**20)
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return _Holder({})


class _Holder:
    def __init__(self, tensors):
        self.tensors = tensors

    def parameters(self):
        return iter(self.tensors.values())


# ---------------------------------------------------------------- the driver


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def warm(ckpt: str) -> None:
    for f in Path(ckpt).glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def run_method(method, ckpt, device, timeout):
    cmd = [sys.executable, __file__, "--one", method, "--dir", ckpt, "--device", device]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"method": method, "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="checkpoint directory (built if missing)")
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    ap.add_argument("--cold", action="store_true", help="also measure with the page cache dropped")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.dir, a.device)))
        return
    if not (Path(a.dir) / "model.safetensors.index.json").exists():
        import torch

        from pipeline.checkpoint.synthetic import write_checkpoint

        t = time.perf_counter()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
        write_checkpoint(a.dir, a.shape, dtype)
        print(f"built {a.shape} {a.dtype} checkpoint in {time.perf_counter() - t:.1f}s", flush=True)
    methods = a.methods.split(",") if a.methods else (GPU_METHODS if a.device == "cuda" else CPU_METHODS)
    modes = ["warm"] + (["cold"] if a.cold else [])
    samples = []
    for mode in modes:
        for r in range(a.rounds):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]
            for m in order:
                if mode == "cold":
                    if not drop_caches():
                        print("cannot drop the page cache here; cold runs skipped", flush=True)
                        break
                else:
                    warm(a.dir)
                s = run_method(m, a.dir, a.device, a.timeout)
                s.update(mode=mode, round=r)
                samples.append(s)
                print(json.dumps(s), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(samples, indent=1))
    print(summarize(samples, methods, modes))


def summarize(samples, methods, modes) -> str:
    lines = []
    for mode in modes:
        ref = "hf_bf16" if "hf_bf16" in methods else "hf_cpu"
        med = {}
        for m in methods:
            ok = [s for s in samples if s["method"] == m and s.get("mode") == mode and "seconds" in s]
            if ok:
                med[m] = {
                    k: statistics.median(s[k] for s in ok)
                    for k in ("seconds", "gb_per_s", "peak_host_anon_above_baseline")
                }
                if "peak_gpu_bytes" in ok[0]:
                    med[m]["peak_gpu_bytes"] = statistics.median(s["peak_gpu_bytes"] for s in ok)
                med[m]["n"] = len(ok)
        lines.append(f"\n{mode} cache, medians")
        lines.append(
            "| method | n | seconds | GB/s | x vs " + ref + " | peak host anon above baseline (GiB) | peak GPU (GiB) |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for m, v in med.items():
            ratio = med[ref]["seconds"] / v["seconds"] if ref in med else float("nan")
            gpu = f"{v['peak_gpu_bytes'] / 2**30:.2f}" if "peak_gpu_bytes" in v else "-"
            lines.append(
                f"| {m} | {v['n']} | {v['seconds']:.3f} | {v['gb_per_s']:.2f} | {ratio:.2f} | "
                f"{v['peak_host_anon_above_baseline'] / 2**30:.2f} | {gpu} |"
            )
        errs = [s for s in samples if s.get("mode") == mode and "error" in s]
        for s in errs:
            lines.append(f"error: {s['method']}: {s['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
