"""Decode blocks for the caption job: a listing's sources as Arrow rows (``sources_table``), packed
into numbered blocks (``pack_table``, vectorised: the rows reordered by block, with a ``block``
column): small files share a block, a large or unknown-size file is dealt first, an archive
group (a .tar.gz shard, a Parquet row group) is one block of its own. ``block_rows`` makes one
row per block (run by the Ray Data read tasks, jobs/todo_source.py) and ``unpack_blocks`` turns
such a row back into the decode stage's input (run by the decode task), so the driver never
holds the blocks. A block is whole sources from decode to sink (actors/part_writer.py). No Ray
import.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
# MAX_BLOCKS caps one pack_table call, i.e. one todo part of 100k sources (jobs/sources.py): 4-MB
# blocks of 160-KB files are ~3.8k per part, so it binds only on parts of many large files or a
# small --unknown-size-sources (a whole-run cap merged a 1M-source run's blocks 4 to 1; the
# driver no longer holds the blocks, so nothing asks for fewer).
BLOCK_BYTES = 4 << 20
BLOCK_SOURCES = 32
UNKNOWN_SOURCES = 512
UNKNOWN_BLOCK_BYTES = 4 * BLOCK_BYTES
MAX_BLOCKS = 10_000


def pack_table(t: pa.Table, pack: bool = True, unknown_sources: int | None = None,
               block_bytes: int = BLOCK_BYTES, block_sources: int = BLOCK_SOURCES,
               max_blocks: int = MAX_BLOCKS, first: int = 0) -> pa.Table:
    """Sources (columns as ``sources_table``: source_uri, source_version, size, locator) -> the
    same rows, ordered by decode block, with ``block`` (int64, ``first`` on): archive groups
    first (one block each, members in container order, by group key), then sizes <= 0 (unknown,
    by URI, ``unknown_sources`` (default ``block_sources``) to a block), then files of
    ``block_bytes`` or more (one each, largest first), then smaller files packed largest first
    into blocks of up to ``block_bytes`` / ``block_sources``; more than ``max_blocks`` of these
    are merged with their neighbours evenly. ``pack`` False: one block per loose file, in the
    input's order. Vectorised (pyarrow.compute + numpy; one numpy search per small-file block)."""
    t = _columns(t)
    size = np.maximum(pc.fill_null(t.column("size"), 0).to_numpy(zero_copy_only=False), 0)
    key = _group_keys(t.column("locator"))
    grouped = key.is_valid().to_numpy(zero_copy_only=False)
    gorder, gid = _group_order(t, key, grouped)
    idx = np.flatnonzero(~grouped)
    nxt = first + (int(gid[-1]) + 1 if len(gid) else 0)
    parts, blocks = [gorder], [gid + first]
    if not pack:
        parts.append(idx)
        blocks.append(np.arange(len(idx)) + nxt)
    else:
        loose, n = [], 0
        for order, ids in _packed(t, size, idx, unknown_sources or block_sources, block_bytes,
                                  block_sources):
            parts.append(order)
            loose.append(ids + n)
            n += int(ids[-1]) + 1 if len(ids) else 0
        ids = np.concatenate(loose)
        if n > max_blocks:  # millions of sources: merge neighbours evenly
            ids = ids // -(-n // max_blocks)
        blocks.append(ids + nxt)
    order = np.concatenate(parts).astype(np.int64)
    block = np.concatenate(blocks).astype(np.int64)
    return t.take(pa.array(order)).append_column("block", pa.array(block, pa.int64()))


def _packed(t: pa.Table, size: np.ndarray, idx: np.ndarray, per: int, block_bytes: int,
            block_sources: int):
    """(row order, block ids from 0) of the unknown, large and small loose rows ``idx``."""
    unknown = idx[size[idx] <= 0]
    yield unknown[_sort(t, unknown, [("source_uri", "ascending"),
                                     ("source_version", "ascending")])], \
        np.arange(len(unknown)) // per
    sized = idx[size[idx] > 0]
    sized = sized[_sort(t, sized, [("size", "descending"), ("source_uri", "ascending")])]
    big = sized[size[sized] >= block_bytes]
    yield big, np.arange(len(big))
    small = sized[size[sized] < block_bytes]
    # greedy, as a loop over blocks: a block from row i takes the rows whose running size
    # stays within block_bytes (one searchsorted on the cumulative sizes), at most block_sources
    cum = np.cumsum(size[small])
    ids = np.empty(len(small), np.int64)
    i = b = 0
    while i < len(small):
        base = cum[i - 1] if i else 0
        j = min(int(np.searchsorted(cum, base + block_bytes, side="right")), i + block_sources)
        ids[i:j] = b
        i, b = j, b + 1
    yield small, ids


def _sort(t: pa.Table, idx: np.ndarray, keys: list) -> np.ndarray:
    """Positions in ``idx`` that order its rows of ``t`` by ``keys`` (stable)."""
    if len(idx) == 0:
        return idx
    sub = t.select([k for k, _ in keys]).take(pa.array(idx))
    return pc.sort_indices(sub, sort_keys=keys).to_numpy()


def group_containers(loc: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The container of each row whose members decode together (a .tar.gz shard, an HF
    Parquet file; ``layouts.group_key``), null for a row that decodes alone."""
    loc = loc.combine_chunks() if isinstance(loc, pa.ChunkedArray) else loc
    grouped = pc.fill_null(pc.is_in(pc.struct_field(loc, "kind"), pa.array(["tgz", "hf"])),
                           False)
    return pc.if_else(grouped, pc.struct_field(loc, "container"), pa.scalar(None, pa.string()))


def _group_keys(loc: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``layouts.group_key`` of each row, vectorised: container|offset of a Parquet row group,
    container| of a .tar.gz shard; null for a row that decodes alone."""
    loc = loc.combine_chunks() if isinstance(loc, pa.ChunkedArray) else loc
    hf = pc.fill_null(pc.equal(pc.struct_field(loc, "kind"), "hf"), False)
    off = pc.if_else(hf, pc.cast(pc.struct_field(loc, "offset"), pa.string()), "")
    return pc.binary_join_element_wise(group_containers(loc), off, "|")


def _group_order(t: pa.Table, key: pa.Array, grouped: np.ndarray):
    """(row order, block ids from 0) of the grouped rows: by group key, then container order
    (tar order for tgz: the member's offset; row order for hf: its ``length`` field)."""
    idx = np.flatnonzero(grouped)
    if len(idx) == 0:
        return idx, np.zeros(0, np.int64)
    loc = t.column("locator").combine_chunks().take(pa.array(idx))
    hf = pc.equal(pc.struct_field(loc, "kind"), "hf")
    pos = pc.if_else(hf, pc.struct_field(loc, "length"), pc.struct_field(loc, "offset"))
    sub = pa.table({"k": key.take(pa.array(idx)), "p": pos})
    o = pc.sort_indices(sub, sort_keys=[("k", "ascending"), ("p", "ascending")]).to_numpy()
    k = sub.column("k").take(pa.array(o)).combine_chunks()
    new = np.ones(len(o), bool)
    new[1:] = pc.not_equal(k[1:], k[:-1]).to_numpy(zero_copy_only=False)
    return idx[o], np.cumsum(new) - 1


def _columns(t: pa.Table) -> pa.Table:
    """``sources_table``'s columns (size 0 and locator null where absent)."""
    n = t.num_rows
    if "size" not in t.column_names:
        t = t.append_column("size", pa.array(np.zeros(n, np.int64)))
    if "locator" not in t.column_names:
        t = t.append_column("locator", pa.nulls(n, layouts.LOCATOR_TYPE))
    return t.select(SOURCE_TYPE.names).cast(SOURCE_TYPE)


def block_rows(packed: pa.Table) -> pa.Table:
    """A ``pack_table`` result -> ONE row per block: ``block`` (int64) and ``sources``
    (list<struct> of the block's rows, SOURCE_TYPE's columns, in order). Vectorised (offsets
    where ``block`` changes). One row per block lets Ray Data cut a stream of them into blocks
    of one row each (jobs/pipeline.py) without ever cutting a decode block."""
    b = packed.column("block").to_numpy() if packed.num_rows else np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]]) if len(b) else np.zeros(0, np.int64)
    rows = pa.StructArray.from_arrays([packed.column(c).combine_chunks()
                                       for c in SOURCE_TYPE.names], fields=list(SOURCE_TYPE))
    offsets = pa.array(np.r_[starts, len(b)].astype(np.int32))
    return pa.table({"block": pa.array(b[starts], pa.int64()),
                     "sources": pa.ListArray.from_arrays(offsets, rows)})


def unpack_blocks(rows: pa.Table) -> Iterator[pa.Table]:
    """``block_rows`` rows -> the decode stage's input, one table per block (source_uri,
    source_version, locator, size, block): loose files a row each, a group's members (all in one
    block, container order) its one row (``layouts.group_row``). Runs in the decode task."""
    for i in range(rows.num_rows):
        block = rows.column("block")[i].as_py()
        one = pa.Table.from_struct_array(rows.column("sources")[i].values)
        if one.num_rows and _group_keys(one.column("locator"))[0].is_valid:
            u, v, loc = layouts.group_row([(r["source_uri"], r["source_version"], r["size"],
                                            r["locator"]) for r in one.to_pylist()])
            one = pa.table({"source_uri": [u], "source_version": [v],
                            "locator": pa.array([loc], layouts.LOCATOR_TYPE),
                            "size": pa.array([0], pa.int64())})
        # size: 0 = unknown, stat'ed by the decode task (actors/windows.stat_unknown)
        yield one.select(["source_uri", "source_version", "locator", "size"]).append_column(
            "block", pa.repeat(pa.scalar(block, pa.int64()), one.num_rows))


def pack_sources(sources: list[tuple], block_bytes: int = BLOCK_BYTES,
                 block_sources: int = BLOCK_SOURCES, max_blocks: int = MAX_BLOCKS,
                 unknown_sources: int | None = None) -> list[list[tuple[str, str]]]:
    """(uri, version, size) -> blocks of (uri, version), in order (``pack_table`` on tuples:
    tests and small lists)."""
    p = pack_table(sources_table(sources), True, unknown_sources, block_bytes, block_sources,
                   max_blocks)
    out: list[list[tuple[str, str]]] = []
    last = None
    for u, v, b in zip(*(p.column(c).to_pylist() for c in ("source_uri", "source_version",
                                                            "block"))):
        if b != last:
            out.append([])
            last = b
        out[-1].append((u, v))
    return out


def _layout_blocks(sources: list[tuple], pack: bool,
                   unknown_sources: int | None = None) -> list[pa.Table]:
    """Decode-input tables (source_uri, source_version, locator) of (uri, version, size[,
    locator]) tuples, one per block (tests and benches that decode blocks without Ray)."""
    return [b.drop_columns(["block"]) for b in decode_blocks(sources, pack, unknown_sources)]


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
    """Sources (Arrow rows as ``sources_table``, one table or several, or tuples) -> the decode
    stage's input blocks, each a table with ``block`` (int64), which names its part
    (actors/part_writer.py), and ``size`` (int64, 0: unknown, stat'ed by the decode task). All
    blocks at once: for tests and small lists; the caption job packs its todo list chunk by
    chunk as it spills it (jobs/sources.py) and reads the blocks where they are decoded
    (jobs/pipeline.py)."""
    if isinstance(sources, list):
        if sources and isinstance(sources[0], tuple):
            sources = sources_table(sources)
        else:
            sources = (pa.concat_tables([_columns(t) for t in sources]) if sources
                       else SOURCE_TYPE.empty_table())
    return list(unpack_blocks(block_rows(pack_table(sources, pack, unknown_sources))))
