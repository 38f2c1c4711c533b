"""Property test: mutated safetensors headers and indexes either load correctly or give the clean error."""

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.checkpoint import open_checkpoint
from pipeline.checkpoint.header import read_header
from pipeline.dtypes import SAFETENSORS_DTYPES
from pipeline.errors import UserError

FUZZ = settings(
    max_examples=1500,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _original(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "orig.safetensors"
    save_file(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.bfloat16),
            "c": torch.zeros(3, dtype=torch.int64),
        },
        path,
    )
    return path.read_bytes()


_ORIG = {}


def _orig_bytes(tmp_path_factory):
    if "raw" not in _ORIG:
        _ORIG["raw"] = _original(tmp_path_factory)
    return _ORIG["raw"]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),
    st.tuples(st.just("json"), st.integers(0, 10_000), st.sampled_from(list(b'{}[]",:0123456789-e.'))),
)


def _mutate(raw: bytes, ops) -> bytes:
    data = bytearray(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    for kind, pos, val in ops:
        if kind == "flip" and data:
            data[pos % len(data)] = val
        elif kind == "truncate":
            del data[pos % (len(data) + 1) :]
        elif kind == "insert":
            data.insert(pos % (len(data) + 1), val)
        elif kind == "length" and len(data) >= 8:
            data[:8] = struct.pack("<Q", val)
        elif kind == "json" and n and 8 + pos % n < len(data):
            data[8 + pos % n] = val
    return bytes(data)


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_headers_load_correctly_or_fail_cleanly(ops, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz_case.safetensors"
    path.write_bytes(_mutate(_orig_bytes(tmp_path_factory), ops))
    try:
        tensors, _ = read_header(str(path))
    except UserError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    # Accepted: safetensors' own reader must agree, tensor by tensor and byte by byte.
    raw = path.read_bytes()
    with safe_open(str(path), "pt") as fh:
        assert set(fh.keys()) == set(tensors)
        for name, info in tensors.items():
            t = fh.get_tensor(name)
            assert tuple(t.shape) == info.shape and t.dtype == SAFETENSORS_DTYPES[info.dtype]
            assert t.contiguous().view(torch.uint8).numpy().tobytes() == raw[info.start : info.end]


@FUZZ
@given(
    weight_map=st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.one_of(
            st.just("s1.safetensors"),
            st.just("s2.safetensors"),
            st.text(max_size=12),
            st.just("../s1.safetensors"),
            st.just("/etc/passwd"),
            st.integers(),
            st.none(),
        ),
        max_size=4,
    ),
    wrap=st.booleans(),
)
def test_mutated_indexes_load_correctly_or_fail_cleanly(weight_map, wrap, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "fuzz_index"
    root.mkdir(exist_ok=True)
    save_file({"x": torch.zeros(2)}, root / "s1.safetensors")
    save_file({"y": torch.zeros(3)}, root / "s2.safetensors")
    doc = {"weight_map": weight_map} if wrap else weight_map
    (root / "model.safetensors.index.json").write_text(json.dumps(doc))
    try:
        ck = open_checkpoint(str(root))
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert set(ck.tensors) == set(weight_map)
    for name, info in ck.tensors.items():
        assert info.file == str(root / weight_map[name])
