"""How the caption job deals sources into decode tasks (jobs.blocks.pack_sources), and the sizes
the listing (jobs.sources) gives them."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.caption import BLOCK_BYTES, pack_sources
from jobs.sources import list_sources

MB = 1 << 20


def _flat(blocks):
    return [s for b in blocks for s in b]


def test_small_files_share_blocks_large_and_unknown_are_alone_largest_first():
    src = [(f"s3://b/clip{i:03d}.mp4", f"e{i}", 160_000) for i in range(100)]
    src += [("s3://b/hour1.flac", "h1", 300 * MB), ("s3://b/hour0.flac", "h0", 600 * MB),
            ("s3://b/unknown.mp4", "u", 0), ("s3://b/mid.mp3", "m", 3 * MB)]
    blocks = pack_sources(src)
    flat = _flat(blocks)
    # every source exactly once, versions kept
    assert sorted(flat) == sorted((u, v) for u, v, _ in src)
    # unknown size first (might be the largest), then by size
    assert blocks[0] == [("s3://b/unknown.mp4", "u")]
    assert blocks[1] == [("s3://b/hour0.flac", "h0")]
    assert blocks[2] == [("s3://b/hour1.flac", "h1")]
    sizes = {u: n for u, _, n in src}
    for b in blocks[3:]:
        assert sum(sizes[u] for u, _ in b) <= BLOCK_BYTES and len(b) <= 32
    # 3 MB + 160 KB clips: 100 clips need 4 more blocks (26 per 4 MB), not 100
    assert len(blocks) == 3 + 5


def test_block_limits_and_the_block_cap():
    src = [(f"f{i:05d}", "", 1000) for i in range(1000)]
    b = pack_sources(src, block_bytes=10_000, block_sources=32)
    assert [len(x) for x in b] == [10] * 100  # 10 x 1000 B fill a 10,000-B block exactly
    b = pack_sources(src, block_bytes=1 << 30, block_sources=32)
    assert [len(x) for x in b] == [32] * 31 + [8]
    capped = pack_sources(src, block_bytes=1, max_blocks=300)  # all "large": 1000 blocks -> cap
    assert len(capped) <= 300 and sorted(_flat(capped)) == sorted((u, v) for u, v, _ in src)
    assert pack_sources([]) == []


def test_listing_carries_sizes(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"x" * 1234)
    (tmp_path / "b.mp3").write_bytes(b"y" * 10)
    got = list_sources(str(tmp_path))
    assert [(u.rsplit("/", 1)[-1], n) for u, n in zip(got["source_uri"].to_pylist(),
                                                       got["size"].to_pylist())] == [
        ("a.wav", 1234), ("b.mp3", 10)]
    # a manifest may give sizes; without the column they are unknown (0)
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["s3://x/1.wav", "s3://x/2.wav"], "size": [5, None]}), m)
    got = list_sources(str(m)).select(["source_uri", "source_version", "size"]).to_pylist()
    assert got == [{"source_uri": "s3://x/1.wav", "source_version": "", "size": 5},
                   {"source_uri": "s3://x/2.wav", "source_version": "", "size": 0}]


def test_unknown_sizes_share_blocks():
    """A manifest without sizes: sources share blocks of BLOCK_SOURCES (one task per source
    cost ~8 ms of framework each), dealt before the sized ones."""
    src = [(f"s3://b/u{i:03d}.wav", "", 0) for i in range(70)] + [("s3://b/k.wav", "", 1000)]
    blocks = pack_sources(src, block_sources=32)
    assert [len(b) for b in blocks] == [32, 32, 6, 1]
    assert blocks[-1] == [("s3://b/k.wav", "")]
    assert sorted(_flat(blocks)) == sorted((u, v) for u, v, _ in src)
