"""Every bad checkpoint a user can hand us: exit 2, the culprit on the last stderr line, no traceback,
and the checkpoint directory byte-identical afterwards."""

import json
import shutil
import struct

import pytest
from helpers import rewrite_header, run_cli, tree_digest


def _first_shard(ck):
    return sorted(ck.glob("*.safetensors"))[0]


def _tensor_names(shard):
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]


def no_config(ck):
    (ck / "config.json").unlink()
    return "config.json"


def truncated(ck):
    s = _first_shard(ck)
    s.write_bytes(s.read_bytes()[:-100])
    return s.name


def absurd_length(ck):
    s = _first_shard(ck)
    raw = s.read_bytes()
    s.write_bytes(struct.pack("<Q", 10**15) + raw[8:])
    return s.name


def not_json(ck):
    s = _first_shard(ck)
    raw = bytearray(s.read_bytes())
    raw[8:12] = b"\xff\xfe{["
    s.write_bytes(bytes(raw))
    return s.name


def unknown_dtype(ck):
    s = _first_shard(ck)
    name = _tensor_names(s)[0]
    rewrite_header(s, lambda h: h[name].update(dtype="Q4"))
    return name


def overlapping(ck):
    s = _first_shard(ck)
    names = [n for n in _tensor_names(s)]
    if len(names) < 2:
        pytest.skip("first shard holds one tensor")

    def mutate(h):
        a, b = sorted(names, key=lambda n: h[n]["data_offsets"][0])[:2]
        size_b = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size_b]

    rewrite_header(s, mutate)
    return s.name


def past_the_end(ck):
    s = _first_shard(ck)
    name = _tensor_names(s)[-1]
    rewrite_header(
        s,
        lambda h: h[name].update(data_offsets=[h[name]["data_offsets"][0] + 10**9, h[name]["data_offsets"][1] + 10**9]),
    )
    return name


def index_missing_shard(ck):
    s = _first_shard(ck)
    s.unlink()
    return s.name


def _index_entry(ck, entry):
    idx = ck / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"][next(iter(doc["weight_map"]))] = entry
    idx.write_text(json.dumps(doc))
    return entry


def index_absolute(ck):
    return _index_entry(ck, "/etc/passwd")


def index_dotdot(ck):
    return _index_entry(ck, "../../secret.safetensors")


def index_not_json(ck):
    (ck / "model.safetensors.index.json").write_text("{weight_map: nope")
    return "model.safetensors.index.json"


def shape_mismatch(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["hidden_size"] = 96
    cfg["head_dim"] = 24
    (ck / "config.json").write_text(json.dumps(cfg))
    return "has shape"


CASES = [
    no_config,
    truncated,
    absurd_length,
    not_json,
    unknown_dtype,
    overlapping,
    past_the_end,
    index_missing_shard,
    index_absolute,
    index_dotdot,
    index_not_json,
    shape_mismatch,
]


@pytest.mark.parametrize("corrupt", CASES, ids=[c.__name__ for c in CASES])
def test_bad_checkpoint(corrupt, tiny, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny("llama"), ck)
    culprit = corrupt(ck)
    before = tree_digest(ck)
    p = run_cli(f"checkpoint.path={ck}", f"hydra.run.dir={tmp_path / 'run'}")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-2000:]
    assert culprit in last, last
    assert last.startswith("error: ") and "Traceback" not in p.stderr
    assert tree_digest(ck) == before
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "error" and culprit in report["error"]
