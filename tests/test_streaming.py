"""The parallel streaming reader: bit-identical to safetensors' own load, bounded buffers, int8 exact."""

import pytest
import torch
from helpers import ARCHS
from safetensors import safe_open

from pipeline import load
from pipeline.quant.bnb import import_bitsandbytes

SMALL = ["stages.load_shards.reader=stream", "stages.load_shards.chunk_mib=0.01", "stages.load_shards.threads=3"]


def _safetensors_state(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_reader_is_bit_identical_to_safetensors(arch, tiny, tmp_path):
    path = tiny(arch, torch.bfloat16)
    result = load([f"checkpoint.path={path}", "quantization=none", *SMALL], run_dir=tmp_path / "run")
    assert result.report["status"] == "ok"
    assert result.report["load"]["reader"]["streamed"] == len(_safetensors_state(path))
    ours = result.model.state_dict()
    for key, tensor in _safetensors_state(path).items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key


def test_stream_reader_casts_like_torch_with_a_tiny_temp_budget(tiny, tmp_path):
    path = tiny("llama", torch.bfloat16)
    result = load(
        [f"checkpoint.path={path}", "quantization=none", "dtype=fp32", "stages.load_shards.temp_mib=0.001", *SMALL],
        run_dir=tmp_path / "run",
    )
    assert result.report["status"] == "ok"
    ours = result.model.state_dict()
    for key, tensor in _safetensors_state(path).items():
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], tensor.to(torch.float32)), key


def test_stream_reader_int8_equals_bitsandbytes(tiny, tmp_path):
    bnb = import_bitsandbytes()
    path = tiny("bloom")
    result = load([f"checkpoint.path={path}", "quantization=int8", *SMALL], run_dir=tmp_path / "run")
    assert result.report["status"] == "ok"
    ref = _safetensors_state(path)
    n = 0
    for name, m in result.model.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(ref[f"{name}.weight"].to(torch.float16))
            scb_ours = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
            assert torch.equal(m.weight.data, cb) and torch.equal(scb_ours, scb), name
            n += 1
    assert n == result.report["quantization"]["quantized"] > 0


def test_cpu_tensors_in_their_dtype_are_zero_copy_views_of_the_file(tiny, tmp_path):
    path = tiny("llama", torch.bfloat16)
    before = _safetensors_state(path)
    result = load([f"checkpoint.path={path}", "quantization=none"], run_dir=tmp_path / "run")
    r = result.report["load"]
    assert r["reader"]["mapped"] == len(before) and r["reader"]["streamed"] == 0
    w = result.model.model.layers[0].mlp.up_proj.weight
    assert _mapped_from(w.data_ptr()).endswith(".safetensors")  # the weight lives in the file's mapping
    w.data.add_(1)  # copy-on-write: the checkpoint never changes
    assert torch.equal(
        _safetensors_state(path)["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )


def _mapped_from(address: int) -> str:
    """The file behind the memory mapping that holds `address` ('' for anonymous memory)."""
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5] if len(parts) > 5 else ""
    return ""


def test_unknown_reader(tiny, tmp_path):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="stages.load_shards.reader: unknown reader 'fast'"):
        load([f"checkpoint.path={tiny('llama')}", "stages.load_shards.reader=fast"], run_dir=tmp_path / "run")


def test_resident_fraction_tells_cached_from_never_read(tmp_path):
    from pipeline.startup.reader import resident_fraction

    cached = tmp_path / "cached.bin"
    cached.write_bytes(b"x" * (8 * 2**20))
    cached.read_bytes()
    hole = tmp_path / "hole.bin"
    with open(hole, "wb") as fh:
        fh.truncate(64 * 2**20)  # a sparse file never read: nothing of it is in the page cache
    assert resident_fraction(str(cached)) > 0.9
    assert resident_fraction(str(hole)) < 0.1


def test_the_allocator_warm_up_reserves_what_lands_on_each_gpu_and_temporaries_up_to_their_cap():
    from pipeline.checkpoint.header import TensorInfo
    from pipeline.loading.streamer import Item, landing_bytes

    def item(name, nbytes, device, final):
        info = TensorInfo(name, "/ckpt/model.safetensors", "BF16", (nbytes // 2,), 0, nbytes)
        return Item(info, torch.device(device), final)

    items = [
        item("a", 1000, "cuda:0", True),
        item("b", 3000, "cuda:0", False),  # cast or quantized later: a temporary buffer
        item("c", 4000, "cuda:0", False),
        item("d", 500, "cuda:1", True),
        item("e", 9999, "cpu", True),  # CPU tensors are memory-mapped views: no device memory
    ]
    # The final tensors whole; the temporaries only up to temp_bytes, since they are freed as they go.
    assert landing_bytes(items, temp_bytes=5000) == {torch.device("cuda:0"): 6000, torch.device("cuda:1"): 500}
    assert landing_bytes(items, temp_bytes=10**9) == {torch.device("cuda:0"): 8000, torch.device("cuda:1"): 500}
