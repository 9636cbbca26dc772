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
from overheard.schema import FAILURE_SCHEMA, RETRYABLE, caption_schema


@dataclass
class _Pending:
    version: str = ""
    windows: dict = field(default_factory=dict)   # window_index -> (table, row)
    expected: int | None = None
    failure: dict | None = None                    # the source-level failure row


@dataclass
class Released:
    uri: str
    captions: pa.Table | None      # window rows (all columns of the stream) of a finished source
    failures: list[dict]           # failure rows in FAILURE_SCHEMA's columns (minus run_id)
    windows: int
    audio_s: float


class SourceAssembler:
    def __init__(self):
        self.pending: dict[str, _Pending] = {}

    def add(self, tbl: pa.Table) -> list[Released]:
        uris = tbl.column("source_uri").to_pylist()
        versions = tbl.column("source_version").to_pylist()
        widx = tbl.column("window_index").to_pylist()
        nwin = tbl.column("n_windows").to_pylist()
        etype = tbl.column("error_type").to_pylist()
        touched = set()
        for i, uri in enumerate(uris):
            p = self.pending.setdefault(uri, _Pending(version=versions[i] or ""))
            touched.add(uri)
            if widx[i] < 0:
                p.failure = {k: tbl.column(k)[i].as_py() for k in
                             ("error_type", "error_message", "stage", "windows_kept")}
                p.expected = p.failure["windows_kept"]
            else:
                # a retried upstream task may resend a window: keyed by index, so it collapses
                p.windows[widx[i]] = (tbl, i)
                if nwin[i] >= 0:
                    p.expected = nwin[i]
        released = []
        for uri in touched:
            p = self.pending[uri]
            if p.expected is not None and len(p.windows) >= p.expected:
                released.append(self._release(uri, p))
                del self.pending[uri]
        return released

    def _release(self, uri: str, p: _Pending) -> Released:
        failures = []
        keep = []
        for idx in sorted(p.windows):
            tbl, i = p.windows[idx]
            if tbl.column("error_type")[i].as_py():
                failures.append(dict(
                    source_uri=uri, source_version=p.version,
                    stage=tbl.column("stage")[i].as_py(),
                    error_type=tbl.column("error_type")[i].as_py(),
                    message=f"window {idx}: " + tbl.column("error_message")[i].as_py(),
                    retryable=False, windows_kept=0))
            else:
                keep.append((tbl, i))
        if p.failure is not None:
            retry = p.failure["error_type"] in RETRYABLE
            msg = p.failure["error_message"]
            if retry and keep:
                # a transient fault part-way: keep nothing, so the rerun redoes the whole source
                msg += f" ({len(keep)} windows discarded; the source is redone on rerun)"
                keep = []
            failures.append(dict(
                source_uri=uri, source_version=p.version, stage=p.failure["stage"],
                error_type=p.failure["error_type"], message=msg, retryable=retry,
                windows_kept=len(keep)))
        captions = None
        audio_s = 0.0
        if keep:
            captions = pa.concat_tables([t.slice(i, 1) for t, i in keep]).combine_chunks()
            audio_s = float(pc.sum(pc.subtract(
                captions.column("end_s"), captions.column("start_s"))).as_py() or 0.0)
        return Released(uri, captions, failures, len(keep), audio_s)


def _write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(uri, buf.getvalue())


class PartWriter:
    """Buffers released sources; writes ``captions/part-<run>-<seq>.parquet`` and
    ``failures/part-<run>-<seq>.parquet`` when ``rows_per_part`` rows are buffered or
    ``flush_interval_s`` has passed (bounding the work a killed job loses), and at close."""

    def __init__(self, output: str, run_id: str, embedding_dim: int | None,
                 rows_per_part: int = 50_000, flush_interval_s: float = 60.0):
        self.output, self.run_id = output, run_id
        self.schema = caption_schema(embedding_dim)
        self.rows_per_part, self.flush_interval_s = rows_per_part, flush_interval_s
        self.captions: list[pa.Table] = []
        self.failures: list[dict] = []
        self.rows = 0
        self.seq = 0
        self.last_flush = time.monotonic()
        self.parts: list[str] = []

    def add(self, r: Released) -> None:
        if r.captions is not None:
            self.captions.append(self._to_schema(r.captions))
            self.rows += r.captions.num_rows
        self.failures.extend(r.failures)
        if self.rows >= self.rows_per_part or (
                time.monotonic() - self.last_flush >= self.flush_interval_s):
            self.flush()

    def _to_schema(self, t: pa.Table) -> pa.Table:
        n = t.num_rows
        cols = {}
        for f in self.schema:
            if f.name == "run_id":
                cols[f.name] = pa.array([self.run_id] * n, f.type)
            elif f.name in t.column_names:
                cols[f.name] = t.column(f.name).cast(f.type)
            else:  # scores a stage did not compute (e.g. audibility without guidance)
                cols[f.name] = pa.nulls(n, f.type)
        return pa.table(cols, schema=self.schema)

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        name = f"part-{self.run_id}-{self.seq:05d}.parquet"
        wrote = False
        # captions first: a kill between the two writes leaves a finished source whose
        # failure note is missing, never a failure note whose captions are lost
        if self.captions:
            t = pa.concat_tables(self.captions).sort_by(
                [("source_uri", "ascending"), ("window_index", "ascending")])
            uri = storage.join(self.output, "captions", name)
            _write_parquet(uri, t)
            self.parts.append(uri)
            wrote = True
        if self.failures:
            rows = [dict(r, run_id=self.run_id) for r in self.failures]
            t = pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA).sort_by(
                [("source_uri", "ascending")])
            uri = storage.join(self.output, "failures", name)
            _write_parquet(uri, t)
            self.parts.append(uri)
            wrote = True
        self.captions, self.failures, self.rows = [], [], 0
        if wrote:
            self.seq += 1


def read_table_dir(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All parts under ``uri`` as one table (None if there are none). Temp files are skipped."""
    fs, path = storage.get_fs(uri)
    if not fs.exists(path):
        return None
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet")
                   and not p.rsplit("/", 1)[-1].startswith("."))
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
                    # embeddings, so this costs what done_sources costs
                    pq.ParquetFile(f).read(columns=["source_uri"])
            except Exception:  # noqa: BLE001 - ArrowInvalid, OSError, ...: any unreadable part
                dest = p[: -len(name)] + ".damaged-" + name
                fs.mv(p, dest)
                moved.append(storage.unstrip(fs, dest))
    return moved


def done_sources(output: str) -> set[str]:
    """Sources a rerun must skip: those with captions, and those whose failure is permanent.
    Sources whose only failures are retryable (read errors, timeouts) are attempted again."""
    done: set[str] = set()
    caps = read_table_dir(storage.join(output, "captions"), ["source_uri"])
    if caps is not None:
        done.update(pc.unique(caps.column("source_uri")).to_pylist())
    fails = read_table_dir(storage.join(output, "failures"), ["source_uri", "retryable"])
    if fails is not None:
        perm = fails.filter(pc.invert(fails.column("retryable")))
        done.update(pc.unique(perm.column("source_uri")).to_pylist())
    return done
