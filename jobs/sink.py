"""Driver-side assembly and writing of the caption job's output (no Ray import).

The driver receives window rows in any order. ``SourceAssembler`` holds each source's rows
until its terminal row and all its windows have arrived, then releases the source whole;
``PartWriter`` writes released sources into Parquet parts atomically. A part therefore only
ever holds complete sources, which is what makes resume exact: a source is either in a part
(done) or in none (redone on the next run), never half-written and never written twice.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from overheard import storage
from overheard.schema import FAILURE_SCHEMA, RETRYABLE, caption_rows, caption_schema


_SEQ = "__arrival"  # arrival order of rows in the assembler's buffer (first copy of a row wins)


@dataclass
class Released:
    """What one ``SourceAssembler.add`` call completes: whole sources, as tables (no per-row
    Python objects, so the driver's cost per window is a few Arrow kernels, not a loop)."""
    captions: pa.Table | None   # kept window rows of the released sources (stream columns)
    failures: pa.Table | None   # FAILURE_SCHEMA's columns minus run_id
    sources: int = 0            # sources released
    captioned: int = 0          # ... with at least one kept window
    failed: int = 0             # ... with a read/decode failure, or no window kept
    windows: int = 0            # kept windows
    window_failures: int = 0    # failure rows of single windows (e.g. model_error)
    audio_s: float = 0.0        # sum of kept windows' end_s - start_s
    failures_by_type: dict = field(default_factory=dict)


def _is_in(values, allowed) -> pa.Array:
    return pc.is_in(values, value_set=pa.array(list(allowed), pa.string()))


class SourceAssembler:
    """Holds rows until their source is complete, then releases whole sources.

    A source is complete when its terminal row has arrived (its last window, which carries
    ``n_windows``, or its failure row, which carries ``windows_kept``) and that many distinct
    windows are present. Rows may come in any order and a retried upstream task may resend
    some: the first copy of each (source_uri, window_index) wins. Everything is done with Arrow
    group-bys over the pending rows, so releasing 1,000 one-window sources costs about what
    releasing one does (bench/scale.py: windows/s through assembly and writing)."""

    def __init__(self, min_rows: int = 4096, max_delay_s: float = 0.5):
        # Incoming tables (one per actor batch, ~64 rows) are staged and assembled together
        # once ``min_rows`` are in or ``max_delay_s`` has passed: each assembly costs ~30 Arrow
        # kernel calls whatever its size, so assembling 64 rows at a time capped the driver at
        # ~10k windows/s; 4096 at a time amortises that (bench/scale.py).
        self.min_rows, self.max_delay_s = min_rows, max_delay_s
        self.staged: list[pa.Table] = []
        self.staged_rows = 0
        self.last = time.monotonic()
        self.buf: pa.Table | None = None
        self.seq = 0

    def pending_sources(self) -> int:
        tabs = ([self.buf] if self.buf is not None else []) + [
            t.select(["source_uri"]) for t in self.staged]
        if not tabs:
            return 0
        return len(pc.unique(pa.concat_tables([t.select(["source_uri"]) for t in tabs])
                             .column("source_uri")))

    def add(self, tbl: pa.Table) -> Released | None:
        """Stage ``tbl``; returns the sources completed by what is staged when it is time to
        assemble (else None). ``finish()`` assembles the rest at the end of the stream."""
        self.staged.append(tbl)
        self.staged_rows += tbl.num_rows
        if (self.staged_rows < self.min_rows
                and time.monotonic() - self.last < self.max_delay_s):
            return None
        return self.finish()

    def finish(self) -> Released | None:
        """Assemble everything staged now."""
        if not self.staged:
            return None
        tbl = self.staged[0] if len(self.staged) == 1 else pa.concat_tables(self.staged)
        self.staged, self.staged_rows, self.last = [], 0, time.monotonic()
        tbl = tbl.append_column(_SEQ, pa.array(range(self.seq, self.seq + tbl.num_rows),
                                                pa.int64()))
        self.seq += tbl.num_rows
        buf = tbl if self.buf is None else pa.concat_tables([self.buf, tbl])
        keys = buf.group_by(["source_uri", "window_index"], use_threads=False).aggregate(
            [(_SEQ, "min")])
        if keys.num_rows < buf.num_rows:  # a resent row: keep the first copy of each
            buf = buf.filter(_is_in_int(buf.column(_SEQ), keys.column(f"{_SEQ}_min")))
        idx = buf.column("window_index")
        is_fail = pc.less(idx, 0)
        per = pa.table({
            "source_uri": buf.column("source_uri"),
            "win": pc.cast(pc.invert(is_fail), pa.int64()),
            "fail": pc.cast(is_fail, pa.int64()),
            "nwin": pc.cast(buf.column("n_windows"), pa.int64()),
            "kept": pc.if_else(is_fail, pc.cast(buf.column("windows_kept"), pa.int64()), -1),
        }).group_by("source_uri", use_threads=False).aggregate(
            [("win", "sum"), ("fail", "max"), ("nwin", "max"), ("kept", "max")])
        expected = pc.if_else(pc.greater(per.column("fail_max"), 0), per.column("kept_max"),
                              per.column("nwin_max"))
        complete = pc.and_(pc.greater_equal(expected, 0),
                           pc.greater_equal(per.column("win_sum"), expected))
        done = per.column("source_uri").filter(complete)
        if len(done) == 0:
            self.buf = buf
            return None
        if len(done) == per.num_rows:  # the usual case: everything staged is complete
            self.buf = None
            return _release(buf.drop_columns([_SEQ]), len(done))
        out = _is_in(buf.column("source_uri"), done.to_pylist())
        rest = buf.filter(pc.invert(out))
        self.buf = rest if rest.num_rows else None
        return _release(buf.filter(out).drop_columns([_SEQ]), len(done))


def _is_in_int(values, allowed) -> pa.Array:
    return pc.is_in(values, value_set=allowed.combine_chunks() if isinstance(
        allowed, pa.ChunkedArray) else allowed)


def _release(rows: pa.Table, n_sources: int) -> Released:
    """Failure rows and kept windows of complete sources (``rows``: all their rows)."""
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
    else:
        src_rows = None
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


def _write_parquet(uri: str, table: pa.Table) -> None:
    # zstd, except the embedding: float32 embeddings shrink only ~8% under zstd for ~2.5x the
    # write CPU (30k 512-d windows: 57.5 vs 62.3 MB, 0.46 vs 0.18 CPU-s), and the driver's
    # writing is what bounds its windows/s (bench/scale.py)
    buf = io.BytesIO()
    comp = {n: ("none" if n == "audio_embedding" else "zstd") for n in table.column_names}
    pq.write_table(table, buf, compression=comp)
    storage.write_bytes_atomic(uri, buf.getvalue())


class PartWriter:
    """Buffers released sources; writes ``captions/part-<run>-<seq>.parquet`` and
    ``failures/part-<run>-<seq>.parquet`` when ``rows_per_part`` rows are buffered or
    ``flush_interval_s`` has passed (bounding the work a killed job loses), and at close.
    ``on_commit()`` runs after each written part: everything added before it is then on disk."""

    def __init__(self, output: str, run_id: str, embedding_dim: int | None,
                 rows_per_part: int = 50_000, flush_interval_s: float = 60.0, on_commit=None):
        self.output, self.run_id = output, run_id
        self.schema = caption_schema(embedding_dim)
        self.rows_per_part, self.flush_interval_s = rows_per_part, flush_interval_s
        self.captions: list[pa.Table] = []
        self.failures: list[pa.Table] = []
        self.rows = 0
        self.seq = 0
        self.last_flush = time.monotonic()
        self.parts: list[str] = []
        self.on_commit = on_commit  # called after each part is written (the run manifest)

    def add(self, r: Released) -> None:
        if r.captions is not None:
            self.captions.append(self._to_schema(r.captions))
            self.rows += r.captions.num_rows
        if r.failures is not None:
            self.failures.append(r.failures)
        if self.rows >= self.rows_per_part or (
                time.monotonic() - self.last_flush >= self.flush_interval_s):
            self.flush()

    def _to_schema(self, t: pa.Table) -> pa.Table:
        return caption_rows(t, self.schema, self.run_id)

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        name = f"part-{self.run_id}-{self.seq:05d}.parquet"
        wrote = False
        # captions first: a kill between the two writes leaves a finished source whose
        # failure note is missing, never a failure note whose captions are lost
        if self.captions:
            t = pa.concat_tables(self.captions)
            t = t.take(pc.sort_indices(t.select(["source_uri", "window_index"]),
                                       [("source_uri", "ascending"), ("window_index", "ascending")]))
            uri = storage.join(self.output, "captions", name)
            _write_parquet(uri, t)
            self.parts.append(uri)
            wrote = True
        if self.failures:
            f = pa.concat_tables(self.failures)
            f = f.append_column("run_id", pa.repeat(pa.scalar(self.run_id, pa.string()),
                                                    f.num_rows))
            t = f.select(FAILURE_SCHEMA.names).cast(FAILURE_SCHEMA).sort_by(
                [("source_uri", "ascending")])
            uri = storage.join(self.output, "failures", name)
            _write_parquet(uri, t)
            self.parts.append(uri)
            wrote = True
        self.captions, self.failures, self.rows = [], [], 0
        if wrote:
            self.seq += 1
            if self.on_commit is not None:
                self.on_commit()


def part_files(uri: str) -> tuple[object, list[str]]:
    """(filesystem, sorted paths) of the parts under ``uri`` that count as written: every
    ``.parquet`` file but temp and hidden ones. The one place that decides which parts are
    committed: readers and resume (``done_uris``) go through it."""
    fs, path = storage.get_fs(uri)
    if not fs.exists(path):
        return fs, []
    return fs, sorted(p for p in fs.find(path) if p.endswith(".parquet")
                      and not p.rsplit("/", 1)[-1].startswith("."))


def read_table_dir(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All parts under ``uri`` as one table (None if there are none). Temp files are skipped."""
    fs, files = part_files(uri)
    if not files:
        return None
    tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in files]
    return pa.concat_tables(tables, promote_options="default")


def quarantine_damaged(output: str) -> list[str]:
    """Rename every unreadable Parquet part under OUTPUT/captions and OUTPUT/failures (cut by a
    full disk, damaged by a copy) to a hidden ``.damaged-<name>`` beside it, so neither resume
    nor readers trip over it; its sources are then redone (once: the damaged part is no longer
    read). Called by the caption job under its output lease. Returns the quarantined URIs."""
    moved = []
    for sub in ("captions", "failures"):
        fs, path = storage.get_fs(storage.join(output, sub))
        if not fs.exists(path):
            continue
        for p in sorted(fs.find(path)):
            name = p.rsplit("/", 1)[-1]
            if not name.endswith(".parquet") or name.startswith("."):
                continue
            try:
                with fs.open(p, "rb") as f:
                    # the footer (what a cut file loses) and the column resume reads; not the
                    # embeddings, so this costs what done_uris costs
                    pq.ParquetFile(f).read(columns=["source_uri"])
            except Exception:  # noqa: BLE001 - ArrowInvalid, OSError, ...: any unreadable part
                dest = p[: -len(name)] + ".damaged-" + name
                fs.mv(p, dest)
                moved.append(storage.unstrip(fs, dest))
    return moved


def done_uris(output: str) -> pa.Array:
    """The sources a rerun skips, as one Arrow array of distinct URIs: those with captions, and
    those whose failure is permanent. Sources whose only failures are retryable (read errors,
    timeouts) are attempted again. Read part by part, one column (two for failures), each part
    reduced to its distinct URIs first: memory ~ the distinct URIs, ~100 B each (bench/scale.py
    (d): 1M done sources)."""
    found = [pa.array([], pa.string())]
    fs, files = part_files(storage.join(output, "captions"))
    for f in files:
        found.append(pc.unique(pq.read_table(f, columns=["source_uri"], filesystem=fs)
                               .column("source_uri").combine_chunks()))
    fs, files = part_files(storage.join(output, "failures"))
    for f in files:
        t = pq.read_table(f, columns=["source_uri", "retryable"], filesystem=fs)
        perm = t.filter(pc.invert(t.column("retryable")))
        found.append(pc.unique(perm.column("source_uri").combine_chunks()))
    return pc.unique(pa.concat_arrays([pc.cast(a, pa.string()) for a in found]))
