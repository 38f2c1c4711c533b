"""Check on a host with another torch: our exact CPU int8 kernel replaces bitsandbytes' own where needed.

Run once as is and once with ONEDNN_MAX_CPU_ISA=AVX2 (torch._int_mm then saturates, so ours must
take over bitsandbytes' registered kernel). Prints one JSON line.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.quant import cpu_int8  # noqa: E402
from pipeline.quant.bnb import import_bitsandbytes  # noqa: E402

import_bitsandbytes()
cpu_int8.use_cpu_matmul("exact")
g = torch.Generator().manual_seed(0)
a = torch.randint(-128, 128, (64, 2 * cpu_int8.EXACT_SLICE + 512), generator=g, dtype=torch.int8)
b = torch.randint(-128, 128, (96, a.shape[1]), generator=g, dtype=torch.int8)
got = torch.ops.bitsandbytes.int8_linear_matmul.default(a, b)
print(
    json.dumps(
        {
            "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(),
            "bitsandbytes_uses_int_mm": cpu_int8.bitsandbytes_uses_int_mm(),
            "int_mm_exact": cpu_int8.int_mm_is_exact(),
            "ours_registered": cpu_int8._mode["registered"],
            "via_library": "library" in cpu_int8._mode,
            "exact": torch.equal(got.long(), a.long() @ b.long().t()),
        }
    )
)
