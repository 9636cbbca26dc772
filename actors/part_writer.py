"""The caption job's last stages, run by Ray workers: whole blocks through the models, then one
Parquet part per block (captions and failures), written where the block is.

A decode block (a packed group of sources, ``jobs.blocks.pack_table``) stays ONE block from
decode to sink: the decode task emits all its sources' windows as one block, the model actors
take it whole (``in_blocks``: micro-batches inside the actor), and ``write_part`` writes it as
``captions/part-<run>-b<block>-<attempt>.parquet`` (+ ``failures/...``). A part therefore holds
whole sources, and its name depends only on the run, the block and the run attempt: a retried
task (a writer killed mid-part, a model actor that died, a decode task re-run) rewrites the same
name atomically instead of adding a second copy. A part counts only once the driver has listed
it in the output's commit log (``jobs.sink``), so an uncommitted part (the driver died before
committing it) is never read and its sources are redone by the next run.

Columns in (``write_part``): the model actors' output (``actors.captioner``: window columns +
audio_embedding (optional), caption, logprob, decoding, confidence, model_id, ...) plus
    block: int64       the decode block the rows came from (``decode_sources_in_blocks``)
    part_meta: str     null; on a carrier row, the metadata of a part its decode task wrote; on
                       a block's first row, DEFERRED + the sources its decode task deferred
Columns out: ONE row per part (metadata only; the rows stay in the part), ``META_SCHEMA``:
    part: str (file name), block: int64, files: list<str> (paths under OUTPUT), sources,
    captioned, failed, windows, window_failures, windows_scored, windows_low_confidence,
    windows_with_frames: int64, audio_s: float64, failures_by_type: str (JSON {type: n}),
    model_ids: str (JSON list), writer: str (host:pid), node_id: str (Ray node, or ""),
    deferred: list<struct<source_uri: str, source_version: str, size: int64>> (the block's
    sources its decode task deferred, in no part: ``decode_sources_in_blocks``)
No Ray import: the caption job schedules these (``jobs/caption.py``).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from overheard import storage
from overheard.confidence import LOW
from overheard.schema import FAILURE_SCHEMA, RETRYABLE, caption_rows, caption_schema

# A part of the commit protocol is named part-<run>-b<block>-<attempt>.parquet; parts named
# otherwise (written before the commit log existed, e.g. tests/data/golden) are always read.
PART_RE = re.compile(r"^part-.+-b\d{6,}-[0-9a-f]{8}\.parquet$")
# Fault injection for tests/test_faults.py: a path; the first writer to create it exits (as a
# killed worker would) after writing its captions file and before its failures file.
EXIT_HOOK = "OVERHEARD_FAULT_WRITER_EXIT"


def part_name(run_id: str, block: int, attempt: str) -> str:
    return f"part-{run_id}-b{block:06d}-{attempt}.parquet"


def decode_sources_in_blocks(batch: pa.Table, *, part: dict | None = None,
                             unknown_budget: int = 0, **kwargs):
    """``actors.windows.decode_sources`` over one decode block (input columns + ``block``: int64,
    the same on every row), every output row tagged with that ``block`` and ``part_meta`` (null).
    First ``actors.windows.stat_unknown`` (``unknown_budget``: bytes, 0 = off) stats its sources
    of unknown size: missing ones become ``not_found`` rows unopened, and those past the budget
    are deferred: neither decoded nor written, listed in the part's metadata (``deferred``) for
    the job's next round. They reach the writer on the block's first row, as ``part_meta`` =
    DEFERRED + JSON {block, deferred}.
    The caption job runs it with block shaping off, so a task's tables leave as ONE block. With
    ``part`` (``write_part``'s keyword arguments), a block that decoded to failure rows only
    (missing, corrupt, refused sources) is written here, and what leaves is one carrier row: the
    block's first failure row with ``part_meta`` = the part's metadata (JSON), which the model
    actors pass through like any failure row and ``write_part`` turns back into a metadata row.
    So a block of failures costs no model work and no second write; a carrier (not a separate
    metadata table) because Ray Data joins the outputs of one task into one block, and tables of
    different columns would lose all but the common ones."""
    from actors.windows import decode_sources, stat_unknown

    block = batch.column("block")[0].as_py() if batch.num_rows else -1
    todo, gone, deferred = stat_unknown(batch.drop_columns(["block"]), unknown_budget)
    tables = [_tag(t, block) for t in decode_sources(todo, gone=gone, **kwargs)]
    if part is not None and tables and not any(
            pc.any(pc.greater_equal(t.column("window_index"), 0)).as_py() for t in tables):
        rows = pa.concat_tables(tables, promote_options="default")
        meta = _write_block(rows.drop_columns(["block", "part_meta"]), block, **part)
        meta["deferred"] = deferred
        yield _set_meta(rows.slice(0, 1), json.dumps(meta))
        return
    if deferred and tables:
        tables[0] = _set_meta(tables[0], DEFERRED + json.dumps(dict(block=block,
                                                                    deferred=deferred)))
    yield from tables


# part_meta of a block's first row when the block deferred sources (else part_meta is a
# written part's metadata, JSON)
DEFERRED = "deferred:"


def _set_meta(t: pa.Table, text: str) -> pa.Table:
    """``t`` with ``part_meta`` = ``text`` on its first row."""
    meta = pa.array([text] + [None] * (t.num_rows - 1), pa.string())
    return t.set_column(t.column_names.index("part_meta"), "part_meta", meta)


def _tag(t: pa.Table, block: int) -> pa.Table:
    return t.append_column("block", pa.repeat(pa.scalar(block, pa.int64()), t.num_rows)
                           ).append_column("part_meta", pa.nulls(t.num_rows, pa.string()))


def in_blocks(cls, batch: int):
    """``cls`` (a model actor class) taking WHOLE blocks: its ``__call__`` runs on slices of
    ``batch`` rows and the outputs are joined, so a block (a source's windows with the rest of its
    decode block) is never split across actors, while the model still sees ``batch``-row batches.
    Same class name (Ray's actor and plan names stay ``ClapCaptioner`` etc.)."""

    def __call__(self, block: pa.Table) -> pa.Table:
        if block.num_rows <= batch:
            return cls.__call__(self, block)
        outs = [cls.__call__(self, block.slice(i, batch)) for i in range(0, block.num_rows, batch)]
        return pa.concat_tables(outs, promote_options="default")

    return type(cls.__name__, (cls,), {"__call__": __call__, "__doc__": cls.__doc__})


@dataclass
class Released:
    """What one block's rows become: whole sources, as tables (no per-row Python objects)."""
    captions: pa.Table | None   # kept window rows (stream columns)
    failures: pa.Table | None   # FAILURE_SCHEMA's columns minus run_id
    sources: int = 0            # sources in the block
    captioned: int = 0          # ... with at least one kept window
    failed: int = 0             # ... with a read/decode failure, or no window kept
    windows: int = 0            # kept windows
    window_failures: int = 0    # failure rows of single windows (e.g. model_error)
    audio_s: float = 0.0        # sum of kept windows' end_s - start_s
    failures_by_type: dict = field(default_factory=dict)


def _is_in(values, allowed) -> pa.Array:
    return pc.is_in(values, value_set=pa.array(list(allowed), pa.string()))


def check_complete(rows: pa.Table) -> None:
    """Raise unless every source in ``rows`` is whole: its terminal row (last window with
    ``n_windows``, or a failure row with ``windows_kept``) and that many distinct windows. A
    block is whole by construction; this catches a pipeline that split one."""
    idx = rows.column("window_index")
    is_fail = pc.less(idx, 0)
    per = pa.table({
        "source_uri": rows.column("source_uri"),
        "win": pc.cast(pc.invert(is_fail), pa.int64()),
        "nwin": pc.cast(rows.column("n_windows"), pa.int64()),
        "kept": pc.if_else(is_fail, pc.cast(rows.column("windows_kept"), pa.int64()), -1),
        "fail": pc.cast(is_fail, pa.int64()),
    }).group_by("source_uri", use_threads=False).aggregate(
        [("win", "sum"), ("nwin", "max"), ("kept", "max"), ("fail", "max")])
    expected = pc.if_else(pc.greater(per.column("fail_max"), 0), per.column("kept_max"),
                          per.column("nwin_max"))
    ok = pc.and_(pc.greater_equal(expected, 0), pc.equal(per.column("win_sum"), expected))
    bad = per.column("source_uri").filter(pc.invert(ok))
    if len(bad):
        raise RuntimeError(f"{len(bad)} source(s) arrived incomplete at the part writer "
                           f"(e.g. {bad[0].as_py()}): a block was split")


def release(rows: pa.Table) -> Released:
    """Failure rows and kept windows of whole sources (``rows``: all their rows)."""
    n_sources = len(pc.unique(rows.column("source_uri")))
    idx = rows.column("window_index")
    wins = rows.filter(pc.greater_equal(idx, 0))
    werr = pc.not_equal(wins.column("error_type"), "")
    bad_wins, ok_wins = wins.filter(werr), wins.filter(pc.invert(werr))
    src_fail = rows.filter(pc.less(idx, 0))
    retry = _is_in(src_fail.column("error_type"), RETRYABLE)
    # windows kept per source (before a retryable fault discards them)
    ok_per = ok_wins.group_by("source_uri", use_threads=False).aggregate(
        [("window_index", "count")]) if ok_wins.num_rows else pa.table(
        {"source_uri": pa.array([], pa.string()), "window_index_count": pa.array([], pa.int64())})
    src_rows = None
    if src_fail.num_rows:
        src_fail = src_fail.select(["source_uri", "source_version", "stage", "error_type",
                                    "error_message"]).append_column("__retry", retry).join(
            ok_per, "source_uri", join_type="left outer", use_threads=False)
        n_ok = pc.fill_null(src_fail.column("window_index_count"), 0)
        retry = src_fail.column("__retry")
        # a transient fault part-way: keep nothing, so the rerun redoes the whole source
        discard = pc.and_(retry, pc.greater(n_ok, 0))
        note = pc.binary_join_element_wise(
            " (", pc.cast(n_ok, pa.string()), " windows discarded; the source is redone on rerun)", "")
        msg = pc.if_else(discard, pc.binary_join_element_wise(
            src_fail.column("error_message"), note, ""), src_fail.column("error_message"))
        gone = src_fail.column("source_uri").filter(discard)
        if len(gone):
            ok_wins = ok_wins.filter(pc.invert(_is_in(ok_wins.column("source_uri"),
                                                       gone.to_pylist())))
        src_rows = pa.table({
            "source_uri": src_fail.column("source_uri"),
            "source_version": pc.fill_null(src_fail.column("source_version"), ""),
            "stage": src_fail.column("stage"), "error_type": src_fail.column("error_type"),
            "message": msg, "retryable": retry,
            "windows_kept": pc.cast(pc.if_else(discard, 0, n_ok), pa.int32())})
    win_rows = pa.table({
        "source_uri": bad_wins.column("source_uri"),
        "source_version": pc.fill_null(bad_wins.column("source_version"), ""),
        "stage": bad_wins.column("stage"), "error_type": bad_wins.column("error_type"),
        "message": pc.binary_join_element_wise(
            "window ", pc.cast(bad_wins.column("window_index"), pa.string()), ": ",
            bad_wins.column("error_message"), ""),
        "retryable": pa.array([False] * bad_wins.num_rows, pa.bool_()),
        "windows_kept": pa.array([0] * bad_wins.num_rows, pa.int32())}) if bad_wins.num_rows else None
    parts = [t for t in (win_rows, src_rows) if t is not None]
    failures = pa.concat_tables(parts) if parts else None
    r = Released(captions=ok_wins if ok_wins.num_rows else None, failures=failures,
                 sources=n_sources, windows=ok_wins.num_rows)
    kept_uris = pc.unique(ok_wins.column("source_uri")) if ok_wins.num_rows else pa.array(
        [], pa.string())
    r.captioned = len(kept_uris)
    if failures is not None:
        stage = failures.column("stage")
        src_stage = _is_in(stage, ("read", "decode"))
        r.window_failures = int(pc.sum(pc.cast(pc.invert(src_stage), pa.int64())).as_py() or 0)
        broken = pc.unique(failures.column("source_uri").filter(src_stage))
        # captioned sources that also failed (e.g. truncated) count in both
        r.failed = int(pc.sum(pc.cast(_is_in(broken, kept_uris.to_pylist()), pa.int64())).as_py()
                       or 0)
        for d in pc.value_counts(failures.column("error_type")).to_pylist():
            r.failures_by_type[d["values"]] = d["counts"]
    r.failed += n_sources - r.captioned
    if ok_wins.num_rows:
        r.audio_s = float(pc.sum(pc.subtract(ok_wins.column("end_s"),
                                             ok_wins.column("start_s"))).as_py() or 0.0)
    return r


def to_caption_schema(t: pa.Table, run_id: str) -> pa.Table:
    """Kept window rows -> the caption table's columns and types (overheard.schema), sorted."""
    col = t.schema.field("audio_embedding").type if "audio_embedding" in t.column_names else None
    schema = caption_schema(col.list_size if col is not None else None)
    out = caption_rows(t, schema, run_id)
    return out.take(pc.sort_indices(out.select(["source_uri", "window_index"]),
                                    [("source_uri", "ascending"), ("window_index", "ascending")]))


def to_failure_schema(f: pa.Table, run_id: str) -> pa.Table:
    f = f.append_column("run_id", pa.repeat(pa.scalar(run_id, pa.string()), f.num_rows))
    return f.select(FAILURE_SCHEMA.names).cast(FAILURE_SCHEMA).sort_by(
        [("source_uri", "ascending")])


def write_parquet(uri: str, table: pa.Table) -> None:
    """Atomic (temp + rename / one PUT). zstd, except the embedding: float32 embeddings shrink
    only ~8% under zstd for ~2.5x the write CPU (30k 512-d windows: 57.5 vs 62.3 MB, 0.46 vs
    0.18 CPU-s)."""
    buf = io.BytesIO()
    comp = {n: ("none" if n == "audio_embedding" else "zstd") for n in table.column_names}
    pq.write_table(table, buf, compression=comp)
    storage.write_bytes_atomic(uri, buf.getvalue())


def _count_true(mask) -> int:
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


def write_part(batch: pa.Table, *, output: str, run_id: str, attempt: str,
               node: str = "") -> pa.Table:
    """Ray Data map_batches UDF (batch_size=None, pyarrow): one decode block's rows in, its part
    written under OUTPUT, one metadata row out (see the module docstring). Captions first, then
    failures: a writer killed between them leaves files the retry rewrites under the same names,
    and nothing is read before the driver commits the part. Rows may come from several blocks (a
    task's outputs are joined); each block is written on its own. A carrier row (``part_meta``
    set: a part its decode task wrote) becomes that part's metadata row. ``node``: the writer's
    Ray node id, recorded."""
    if "part_meta" not in batch.column_names:
        batch = batch.append_column("part_meta", pa.nulls(batch.num_rows, pa.string()))
    pm = batch.column("part_meta")
    notes = pc.fill_null(pc.starts_with(pm, DEFERRED), False)
    carried = pc.and_(pm.is_valid(), pc.invert(notes))
    metas = [json.loads(m) for m in pm.filter(carried).to_pylist()]
    deferred = {d["block"]: d["deferred"] for d in (
        json.loads(m[len(DEFERRED):]) for m in pm.filter(notes).to_pylist())}
    rows = batch.filter(pc.invert(carried)) if metas else batch
    blocks = pc.unique(rows.column("block")).to_pylist()
    for b in blocks:
        one = rows if len(blocks) == 1 else rows.filter(pc.equal(rows.column("block"), b))
        metas.append(_write_block(one.drop_columns(["block", "part_meta"]), int(b), output,
                                  run_id, attempt, node))
        metas[-1]["deferred"] = deferred.get(b, [])
    return pa.Table.from_pylist(metas, schema=META_SCHEMA)


META_SCHEMA = pa.schema([
    ("part", pa.string()), ("block", pa.int64()), ("files", pa.list_(pa.string())),
    ("sources", pa.int64()), ("captioned", pa.int64()), ("failed", pa.int64()),
    ("windows", pa.int64()), ("window_failures", pa.int64()), ("windows_scored", pa.int64()),
    ("windows_low_confidence", pa.int64()), ("windows_with_frames", pa.int64()),
    ("audio_s", pa.float64()), ("failures_by_type", pa.string()), ("model_ids", pa.string()),
    ("writer", pa.string()), ("node_id", pa.string()),
    ("deferred", pa.list_(pa.struct([("source_uri", pa.string()), ("source_version", pa.string()),
                                     ("size", pa.int64())]))),
])


def _write_block(rows: pa.Table, block: int, output: str, run_id: str, attempt: str,
                 node: str = "") -> dict:
    check_complete(rows)
    r = release(rows)
    name = part_name(run_id, block, attempt)
    meta = dict(part=name, block=block, files=[], sources=r.sources, captioned=r.captioned,
                failed=r.failed, windows=r.windows, window_failures=r.window_failures,
                windows_scored=0, windows_low_confidence=0, windows_with_frames=0,
                audio_s=r.audio_s, failures_by_type=json.dumps(r.failures_by_type, sort_keys=True),
                model_ids=json.dumps(sorted(m for m in pc.unique(rows.column("model_id"))
                                            .to_pylist() if m) if "model_id" in rows.column_names
                                     else []),
                writer=f"{socket.gethostname()}:{os.getpid()}", node_id=node)
    if r.captions is not None:
        caps = r.captions
        if "has_frame" in caps.column_names:  # the window row's frame flag (overheard.schema)
            meta["windows_with_frames"] = _count_true(pc.fill_null(caps.column("has_frame"),
                                                                   False))
        if "confidence" in caps.column_names:
            c = caps.column("confidence").drop_null()
            meta["windows_scored"] = len(c)
            meta["windows_low_confidence"] = _count_true(pc.less(c, LOW))
        write_parquet(storage.join(output, "captions", name), to_caption_schema(caps, run_id))
        meta["files"].append(f"captions/{name}")
        hook = os.environ.get(EXIT_HOOK)
        if hook:
            try:
                os.close(os.open(hook, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(1)  # the first writer dies here, mid-part
            except FileExistsError:
                pass
    if r.failures is not None:
        write_parquet(storage.join(output, "failures", name), to_failure_schema(r.failures,
                                                                                  run_id))
        meta["files"].append(f"failures/{name}")
    return meta


__all__ = ["write_part", "release", "check_complete", "in_blocks", "decode_sources_in_blocks", "part_name",
           "PART_RE", "META_SCHEMA", "Released"]
