"""The streamer's threads, chunk and pinned pool: chosen from the machine when the config leaves them null,
taken as given otherwise, and reported as used."""

from __future__ import annotations

import os

from pipeline import load
from pipeline.loading.streamer import ShardStreamer, machine_defaults


def test_machine_defaults_follow_the_core_count_and_bound_the_pool():
    shape = machine_defaults()
    cores = os.cpu_count() or 8
    assert shape.threads == max(2, min(12, cores * 3 // 4))
    assert shape.chunk == 16 * 2**20
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert shape.chunk <= shape.staging <= max(shape.chunk, min(2 * shape.threads * shape.chunk, ram // 64))


def test_given_values_are_kept():
    s = ShardStreamer(threads=3, chunk_bytes=2**20, staging_bytes=5 * 2**20)
    assert (s.threads, s.chunk, s.staging) == (3, 2**20, 5 * 2**20)


def test_report_says_what_the_reader_used(tiny, tmp_path):
    r = load(
        [f"checkpoint.path={tiny('llama')}", "quantization=none", "stages.load_shards.threads=3"], run_dir=tmp_path
    )
    reader = r.report["load"]["reader"]
    assert reader["threads"] == 3 and reader["chunk_mib"] == 16
    assert reader["staging_mib"] == machine_defaults(3).staging / 2**20
