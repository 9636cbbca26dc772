"""Decode blocks for the caption job: a listing's sources as Arrow rows (``sources_table``), packed
into the numbered blocks the decode stage takes (``decode_blocks``): small files share a block,
a large or unknown-size file is dealt first, an archive group (a .tar.gz shard, a Parquet row
group) is one block of its own. A block is whole sources from decode to sink (jobs/caption.py).
"""

from __future__ import annotations

import pyarrow as pa

from overheard import layouts


# Source packing for the decode stage. A Ray Data task per source costs ~0.05-0.1 CPU-s of
# scheduling, Arrow and object-store work (measured: bench/throughput.py --clips 600, README
# "Performance"), as much as decoding a 10-s clip; but several large files in one task decode
# serially on one core while others idle. So: small files share a block up to BLOCK_BYTES
# (4 MB ~ 4 min of 128-kbit AAC ~ 1-2 CPU-s of decoding) or BLOCK_SOURCES, a file of unknown
# or larger size is alone, and blocks are dealt largest first so hour-long files start early
# instead of forming the run's tail. Sources of unknown size (a manifest without sizes) are
# packed UNKNOWN_SOURCES to a block (dealt first, as they may be large): one task per such
# source cost ~8 ms of framework per source (20k missing files: 126 sources/s, bench/scale.py
# (b)), and Ray Data's per-block cost (3 stages) still capped blocks of 32 at ~300-700
# sources/s; 128: 1.1-2.3k/s, 512: 1.9-3.2k/s (first output 17-43 / 8-38 / 9-19 s at load
# average 3.5-25; at 3.5: 703 / 2,263 / 3,239 sources/s, 16.7 / 7.8 / 9.2 s).
# Such a block is safe although its files may be hour-long: its decode task stats them first
# and decodes only up to UNKNOWN_BLOCK_BYTES of them (the first always), deferring the rest to
# the job's next round, where their sizes are known (actors/windows.stat_unknown); so with
# real audio the first round is mostly a stat pass and the second decodes normal blocks.
# A block stays whole until its part is written (actors/part_writer.py), so a decode task holds
# its block's windows: ~23 MB of float32 per 4 MB of 16-kHz wav, a source's own size when alone.
BLOCK_BYTES = 4 << 20
BLOCK_SOURCES = 32
UNKNOWN_SOURCES = 512
UNKNOWN_BLOCK_BYTES = 4 * BLOCK_BYTES
MAX_BLOCKS = 10_000


def pack_sources(sources: list[tuple[str, str, int]], block_bytes: int = BLOCK_BYTES,
                 block_sources: int = BLOCK_SOURCES, max_blocks: int = MAX_BLOCKS,
                 unknown_sources: int | None = None) -> list[list[tuple[str, str]]]:
    """(uri, version, size) -> blocks of (uri, version), largest block first. Every source is
    in exactly one block; sizes <= 0 (unknown) share blocks of ``unknown_sources`` (default
    ``block_sources``), dealt first."""
    unknown = sorted((u, v) for u, v, n in sources if n <= 0)
    per = unknown_sources or block_sources
    big = [(u, v) for u, v, n in sorted(sources, key=lambda s: (-s[2], s[0])) if n >= block_bytes]
    small = sorted(((u, v, n) for u, v, n in sources if 0 < n < block_bytes),
                   key=lambda s: (-s[2], s[0]))
    blocks = [unknown[i:i + per] for i in range(0, len(unknown), per)]
    blocks += [[s] for s in big]
    cur: list[tuple[str, str]] = []
    used = 0
    for u, v, n in small:
        if cur and (used + n > block_bytes or len(cur) >= block_sources):
            blocks.append(cur)
            cur, used = [], 0
        cur.append((u, v))
        used += n
    if cur:
        blocks.append(cur)
    if len(blocks) > max_blocks:  # millions of sources: merge neighbours evenly
        step = -(-len(blocks) // max_blocks)
        blocks = [[s for b in blocks[i:i + step] for s in b] for i in range(0, len(blocks), step)]
    return blocks


def _layout_blocks(sources: list[tuple], pack: bool,
                   unknown_sources: int | None = None) -> list[pa.Table]:
    """Decode-input blocks when archive layouts are present: the sources of one group (a .tar.gz
    shard: one stream; a Parquet row group: one read) become one row and one block of their own;
    the rest (loose files, tar members, spans) are packed like loose files. Each row carries its
    locator (null for loose files)."""
    groups: dict[str, list[tuple]] = {}
    single: list[tuple] = []
    for s in sources:
        loc = s[3] if len(s) == 4 else None
        key = layouts.group_key(loc)
        (groups.setdefault(key, []) if key else single).append(s)
    locs = {s[0]: (s[3] if len(s) == 4 else None) for s in single}
    sized = [(u, v, n) for u, v, n, *_ in single]
    size_of = {u: n for u, _, n in sized}
    blocks = (pack_sources(sized, unknown_sources=unknown_sources) if pack
              else [[(u, v)] for u, v, _ in sized])
    # groups first: a whole shard / row group is the largest unit, and large blocks start first
    # (see pack_sources) so they do not form the run's tail
    rows = [[layouts.group_row(sorted(g, key=_container_order)) + (0,)]
            for _, g in sorted(groups.items())]
    rows += [[(u, v, locs[u], size_of[u]) for u, v in b] for b in blocks]
    return [pa.table({"source_uri": pa.array([r[0] for r in b], pa.string()),
                      "source_version": pa.array([r[1] for r in b], pa.string()),
                      "locator": pa.array([r[2] for r in b], layouts.LOCATOR_TYPE),
                      "size": pa.array([r[3] for r in b], pa.int64())})
            for b in rows]


def _container_order(s: tuple):
    """Members of a group in the order their container holds them (tar order / row order)."""
    loc = s[3]
    return loc["length"] if loc["kind"] == "hf" else loc["offset"]


SOURCE_TYPE = pa.schema([("source_uri", pa.string()), ("source_version", pa.string()),
                         ("size", pa.int64()), ("locator", layouts.LOCATOR_TYPE)])


def sources_table(sources: list[tuple]) -> pa.Table:
    """A listing as (uri, version[, size[, locator]]) tuples -> the Arrow rows ``build`` takes:
    source_uri, source_version, size (int64; 0 or -1 = unknown), locator (null: a loose file)."""
    return pa.table({
        "source_uri": pa.array([s[0] for s in sources], pa.string()),
        "source_version": pa.array([s[1] or "" for s in sources], pa.string()),
        "size": pa.array([int(s[2]) if len(s) > 2 and s[2] else 0 for s in sources], pa.int64()),
        "locator": pa.array([s[3] if len(s) > 3 else None for s in sources],
                            layouts.LOCATOR_TYPE)}, schema=SOURCE_TYPE)


def decode_blocks(sources: pa.Table | list, pack: bool = True,
                  unknown_sources: int | None = None) -> list[pa.Table]:
    """Sources (Arrow rows as ``sources_table``, one table or several) -> the decode stage's
    input blocks, numbered: each block's rows carry ``block`` (int64, its index), which names its
    part (actors/part_writer.py), and ``size`` (int64, 0: unknown, stat'ed by the decode task)."""
    if isinstance(sources, list):
        sources = pa.concat_tables(sources) if sources else SOURCE_TYPE.empty_table()
    locs = (sources.column("locator").to_pylist() if "locator" in sources.column_names
            else [None] * sources.num_rows)
    sizes = (sources.column("size").to_pylist() if "size" in sources.column_names
             else [0] * sources.num_rows)
    rows = [(u, v or "", max(int(n or 0), 0)) + ((loc,) if loc is not None else ())
            for u, v, n, loc in zip(sources.column("source_uri").to_pylist(),
                                    sources.column("source_version").to_pylist(), sizes, locs)]
    return [b.append_column("block", pa.repeat(pa.scalar(i, pa.int64()), b.num_rows))
            for i, b in enumerate(_layout_blocks(rows, pack, unknown_sources))]
