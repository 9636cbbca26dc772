"""How the caption job deals sources into decode tasks (jobs.blocks.pack_sources), and the sizes
the listing (jobs.sources) gives them."""

from __future__ import annotations

import numpy as np
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


# ------------------------------------------------------------ Arrow packing vs a simple reference

def _reference(sources, block_bytes, block_sources, max_blocks, unknown_sources=None):
    """The greedy packing as it was written on Python tuples before pack_table (the spec)."""
    unknown = sorted((u, v) for u, v, n in sources if n <= 0)
    per = unknown_sources or block_sources
    big = [(u, v) for u, v, n in sorted(sources, key=lambda s: (-s[2], s[0])) if n >= block_bytes]
    small = sorted(((u, v, n) for u, v, n in sources if 0 < n < block_bytes),
                   key=lambda s: (-s[2], s[0]))
    blocks = [unknown[i:i + per] for i in range(0, len(unknown), per)]
    blocks += [[s] for s in big]
    cur, used = [], 0
    for u, v, n in small:
        if cur and (used + n > block_bytes or len(cur) >= block_sources):
            blocks.append(cur)
            cur, used = [], 0
        cur.append((u, v))
        used += n
    if cur:
        blocks.append(cur)
    if len(blocks) > max_blocks:
        step = -(-len(blocks) // max_blocks)
        blocks = [[s for b in blocks[i:i + step] for s in b] for i in range(0, len(blocks), step)]
    return blocks


def _loc(kind, container, offset, length=0):
    return {"kind": kind, "container": container, "container_size": 1 << 20, "offset": offset,
            "length": length, "start_s": None, "end_s": None, "meta": "", "error_type": "",
            "message": f"m{offset}", "members": None}


def test_arrow_packing_matches_the_reference_on_random_inputs():
    """pack_table gives the reference's blocks, in its order, on random sizes (unknown, small,
    large, ties), and holds the limits: every source once, a block of several sources within
    block_bytes and block_sources."""
    from jobs.blocks import pack_table, sources_table

    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(0, 400))
        block_bytes = int(rng.choice([1000, 10_000, 100_000]))
        sizes = rng.choice([-1, 0, 1, 10, 100, 500, 999, 1000, 5000, 20_000, 200_000], n)
        sizes = np.where(rng.random(n) < 0.3, rng.integers(1, 2 * block_bytes, n), sizes)
        src = [(f"s3://b/{rng.integers(0, 10**6):07d}-{i}.wav", f"v{i % 3}", int(s))
               for i, s in enumerate(sizes)]
        bs, mb = int(rng.integers(1, 40)), int(rng.choice([3, 50, 10_000]))
        unk = int(rng.choice([0, 1, 5, 64])) or None
        want = _reference(src, block_bytes, bs, mb, unk)
        got = pack_table(sources_table(src), True, unk, block_bytes, bs, mb, first=100)
        blocks = got.column("block").to_pylist()
        assert blocks == sorted(blocks) and (not blocks or blocks[0] == 100), trial
        assert blocks[-1] - 100 + 1 == len(want) if blocks else want == [], trial
        assert pack_sources(src, block_bytes, bs, mb, unk) == want, trial
        sizes_of = {u: n for u, _, n in src}
        assert sorted(s for b in want for s in b) == sorted((u, v) for u, v, _ in src)
        if mb == 10_000:  # no merging: the limits hold for every block of several sources
            for b in want:
                if len(b) > 1 and sizes_of[b[0][0]] > 0:
                    assert sum(sizes_of[u] for u, _ in b) <= block_bytes and len(b) <= bs


def test_groups_are_whole_blocks_first_in_container_order():
    """Archive groups (a .tar.gz shard's members, a Parquet row group's rows) are one block
    each, ahead of the loose files, members in container order whatever the input order; tar
    members (seekable) and JSONL spans pack like loose files."""
    from jobs.blocks import block_rows, pack_table, sources_table, unpack_blocks

    rng = np.random.default_rng(3)
    src = []
    for s in range(3):
        for m in rng.permutation(7):
            src.append((f"s3://b/shard{s}.tar.gz#{m:02d}.flac", "e", 1000,
                        _loc("tgz", f"s3://b/shard{s}.tar.gz", 512 * int(m))))
    for g in (0, 4096):  # two row groups of one HF Parquet file: two groups
        for r in rng.permutation(5):
            src.append((f"s3://b/hf.parquet#{g + r}", "p", 900, _loc("hf", "s3://b/hf.parquet",
                                                                   g, int(r))))
    src += [(f"s3://b/t.tar#{m}.wav", "t", 2000, _loc("tar", "s3://b/t.tar", m)) for m in range(4)]
    src += [(f"s3://b/loose{i}.wav", "", 3000, None) for i in range(40)]
    order = rng.permutation(len(src))
    t = sources_table([src[i] for i in order])
    packed = pack_table(t, block_sources=8)
    assert sorted(packed.column("source_uri").to_pylist()) == sorted(s[0] for s in src)
    blocks = {}
    for u, b in zip(packed.column("source_uri").to_pylist(), packed.column("block").to_pylist()):
        blocks.setdefault(b, []).append(u)
    groups = [blocks[b] for b in sorted(blocks)][:5]  # 2 row groups + 3 shards come first
    assert groups[0] == [f"s3://b/hf.parquet#{r}" for r in range(5)]  # by group key
    assert groups[1] == [f"s3://b/hf.parquet#{4096 + r}" for r in range(5)]
    assert groups[2:] == [[f"s3://b/shard{s}.tar.gz#{m:02d}.flac" for m in range(7)]
                          for s in range(3)]
    rest = [blocks[b] for b in sorted(blocks)][5:]
    assert all(len(b) <= 8 for b in rest) and sum(map(len, rest)) == 44
    # the decode input: a group is one row carrying its members, loose files a row each
    decode = list(unpack_blocks(block_rows(packed)))
    assert [d.num_rows for d in decode[:5]] == [1] * 5
    assert decode[2].column("source_uri")[0].as_py() == "s3://b/shard0.tar.gz"
    members = decode[2].column("locator")[0].as_py()["members"]
    assert [m["uri"] for m in members] == groups[2]
    assert [d.column("block")[0].as_py() for d in decode] == sorted(blocks)
    # unpacked (--set pack_sources=false): groups still whole, every loose file alone
    one = pack_table(t, pack=False)
    assert one.column("block")[-1].as_py() + 1 == 5 + 44


def test_todo_parts_are_packed_chunk_by_chunk(tmp_path, monkeypatch):
    """The todo list is packed as it is spilled: each part carries ``block``, numbers continue
    across parts and no block spans two parts; a part ends between containers, never inside
    one (a shard's members are one block)."""
    from jobs import sources as S

    monkeypatch.setattr(S, "TODO_PART_ROWS", 10)
    rows = [(f"s3://b/a{i:03d}.wav", "", 1000 + i, None) for i in range(23)]
    rows += [(f"s3://b/m.tar.gz#{k:02d}.wav", "", 500, _loc("tgz", "s3://b/m.tar.gz", 512 * k))
             for k in range(14)]
    rows += [(f"s3://b/z{i:03d}.wav", "", 0, None) for i in range(9)]
    t = S._tuples_table(rows)
    w = S._TodoWriter(str(tmp_path / "todo"), packing=dict(pack=True, unknown_sources=4))
    w.add(t.slice(0, 30))  # the shard straddles the two tables the writer is given
    w.add(t.slice(30))
    w.close()
    parts = [pq.read_table(p) for p in w.parts]
    assert w.count == len(rows) and len(parts) >= 3
    seen, blocks = set(), []
    for p in parts:
        b = sorted(set(p.column("block").to_pylist()))
        assert not set(b) & seen
        seen |= set(b)
        blocks += b
        uris = p.column("source_uri").to_pylist()
        shard = [u for u in uris if "m.tar.gz#" in u]
        assert shard == [] or len(shard) == 14  # the shard's members: all in this part
    assert blocks == list(range(len(blocks)))
    assert sorted(u for p in parts for u in p.column("source_uri").to_pylist()) == \
        sorted(r[0] for r in rows)
