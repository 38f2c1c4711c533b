import pytest

from pipeline.errors import UserError
from pipeline.sizes import Caps, MaxMemory, device_key, format_bytes, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        (123, 123),
        ("123", 123),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("20GiB", 20 * 2**30),
        ("20GB", 20 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("64mib", 64 * 2**20),
        ("7B", 7),
    ],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["20 Gigs", "-1GiB", "GiB", "", True, -5, "1e9x"])
def test_parse_size_rejects_and_names_key(bad):
    with pytest.raises(UserError, match=r"memory\.max_memory\.cpu"):
        parse_size(bad, "memory.max_memory.cpu")


def test_max_memory_keys_from_yaml_and_cli_are_the_same():
    from_yaml = MaxMemory.parse({0: "1GiB", 1: 2**30, "cpu": "2GiB"}).sizes
    from_cli = MaxMemory.parse(
        {
            "1": "1GiB",
            "0": "1GiB",
            "cpu": "2GiB",
        }
    ).sizes
    assert isinstance(from_cli, Caps)
    assert from_yaml == from_cli == {"0": 2**30, "1": 2**30, "cpu": 2 * 2**30}
    assert list(from_cli) == ["0", "1", "cpu"]


def test_auto_cap_is_kept_for_later():
    assert MaxMemory.parse({"cpu": "auto"}) == MaxMemory(Caps(), ("cpu",), given=True)


@pytest.mark.parametrize("key,expected", [(0, "0"), ("3", "3"), ("cuda:1", "1"), ("CPU", "cpu"), ("disk", "disk")])
def test_device_key(key, expected):
    assert device_key(key) == expected


def test_unknown_device_key():
    with pytest.raises(UserError, match="unknown device key 'gpu0'"):
        MaxMemory.parse({"gpu0": "1GiB"})


def test_format_bytes():
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(512) == "512 B"
