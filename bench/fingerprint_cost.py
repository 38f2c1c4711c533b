"""What the metric cache's weights fingerprint costs on a GPU (pipeline/measure/fingerprint.py, issue 28).

Builds Llama-shaped bf16 weights on the GPU (random; only bytes matter), then times
`weights_fingerprint` (the keyed sum of 64-bit words on the device) against what hashing on the
host would cost (a copy to the host, then sha256). Needs only torch: the module is loaded by path,
so it runs where the pipeline's other dependencies are not installed.

    python3 bench/fingerprint_cost.py [--layers 32] [--hidden 4096] [--ffn 11008] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, spread  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "pipeline" / "measure" / "fingerprint.py"


def _module():
    spec = importlib.util.spec_from_file_location("fingerprint", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(layers: int, hidden: int, ffn: int, vocab: int, dtype, device) -> torch.nn.Module:
    model = torch.nn.Module()
    shapes = [(vocab, hidden), (vocab, hidden)] + [(hidden, hidden)] * 4 * layers + [(ffn, hidden)] * 3 * layers
    model.weights = torch.nn.ParameterList(
        torch.nn.Parameter(torch.randn(s, device=device, dtype=torch.float32).to(dtype), requires_grad=False)
        for s in shapes
    )
    return model


def _timed(fn, repeats: int = 3) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return spread(times)["median"], out


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("layers", 32), ("hidden", 4096), ("ffn", 11008), ("vocab", 32000)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    print(json.dumps({"machine": machine()}))
    fp = _module()
    model = _model(args.layers, args.hidden, args.ffn, args.vocab, torch.bfloat16, "cuda")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}: {nbytes / 2**30:.2f} GiB of bf16 weights")
    seconds, (digest, read) = _timed(lambda: fp.weights_fingerprint(model, None, 0x1234))
    print(f"fingerprint on the GPU: {seconds:.3f} s ({read / seconds / 1e9:.1f} GB/s) digest {digest}")
    first = model.weights[5]
    first.data.view(torch.uint8).view(-1)[7] ^= 1
    changed = fp.weights_fingerprint(model, None, 0x1234)[0]
    print(f"one bit flipped: digest {changed} ({'differs' if changed != digest else 'SAME'})")
    big = model.weights[0]
    copy_s, host = _timed(lambda: big.cpu())
    hash_s, _ = _timed(lambda: hashlib.sha256(host.view(torch.uint8).numpy()).hexdigest(), 1)
    per_byte = (copy_s + hash_s) / (big.numel() * big.element_size())
    print(f"host alternative (copy + sha256 of the embedding, extrapolated): {per_byte * nbytes:.2f} s")


if __name__ == "__main__":
    main()
