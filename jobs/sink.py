"""What the caption job's output holds, and how a part becomes part of it (no Ray import).

Parquet parts are written by Ray workers (``actors.part_writer``: one part per decode block,
whole sources only, under a name fixed by run, block and run attempt). A part counts once the
driver has listed it in the output's commit log, ``OUTPUT/_commits/<run>-<attempt>-<seq>.json``
(``commit``; each file written atomically). ``part_files`` is the ONE place that decides which
files count: every reader (``read_table_dir``: index, serve, show, search, timeline, export,
golden; ``done_uris``: resume; ``failed_sources``: status and the caption job's failure report)
goes through it. So a part whose writer was killed mid-way, or whose run died before committing
it, is never read, and its sources are redone by the next run (``remove_uncommitted`` deletes
such leftovers under the output lease). Parts named
otherwise (written before the commit log, e.g. tests/data/golden) always count.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.part_writer import PART_RE
from overheard import storage

COMMITS = "_commits"


def commit(output: str, run_id: str, attempt: str, seq: int, files: list[str],
           blocks: list[int], sources: int = 0) -> str:
    """Make ``files`` (paths under OUTPUT, e.g. ``captions/part-...``) count: one commit-log
    record, written atomically (a local rename / one S3 PUT). ``blocks`` and ``sources`` (how
    many the parts hold) are recorded for reading the run's progress back. Returns its URI."""
    uri = storage.join(output, COMMITS, f"{run_id}-{attempt}-{seq:06d}.json")
    storage.write_bytes_atomic(uri, json.dumps(dict(
        run_id=run_id, attempt=attempt, seq=seq, committed_at=time.time(), blocks=blocks,
        sources=sources, files=files)).encode())
    return uri


def committed_files(output: str, run_id: str | None = None) -> set[str]:
    """Every file path (relative to OUTPUT) listed in the output's commit log (with ``run_id``:
    that run's only)."""
    fs, path = storage.get_fs(storage.join(output, COMMITS))
    try:
        names = [p for p in fs.ls(path, detail=False) if p.endswith(".json")
                 and not p.rsplit("/", 1)[-1].startswith(".")]
    except FileNotFoundError:
        return set()
    out: set[str] = set()
    for p in names:
        with fs.open(p, "rb") as f:
            rec = json.loads(f.read())
        if run_id is None or rec.get("run_id") == run_id:
            out.update(rec["files"])
    return out


def counts(table_dir: str):
    """A predicate on the file names/URIs under a table folder (``OUTPUT/captions`` or
    ``OUTPUT/failures``): True for a Parquet file that counts: not hidden (temp files,
    ``.damaged-*``) and, for parts of the commit protocol, listed in OUTPUT's commit log. Readers
    that list parts themselves (index, export, serve, timeline, evaluate) filter with it."""
    table = table_dir.rstrip("/").rsplit("/", 1)[-1]
    output = table_dir.rstrip("/").rsplit("/", 1)[0] if "/" in table_dir.rstrip("/") else "."
    committed: set[str] | None = None

    def ok(uri: str) -> bool:
        nonlocal committed
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if not name.endswith(".parquet") or name.startswith("."):
            return False
        if PART_RE.match(name):
            if committed is None:
                committed = committed_files(output)
            return f"{table}/{name}" in committed
        return True
    return ok


def part_files(uri: str) -> list[str]:
    """The Parquet files under a table folder that count (``counts``), sorted, as paths of
    ``uri``'s filesystem. The one place that decides which parts are committed."""
    fs, path = storage.get_fs(uri)
    if not fs.exists(path):
        return []
    ok = counts(uri)
    return [p for p in sorted(fs.find(path)) if ok(p)]


def remove_uncommitted(output: str, attempt: str | None = None) -> list[str]:
    """Delete parts of the commit protocol that no commit lists (a killed driver's, a retried
    writer's leftovers); with ``attempt``, only that run attempt's. Call only under the output
    lease (no other run is writing). Returns the removed URIs."""
    committed = committed_files(output)
    removed = []
    for sub, fs, p, name in _table_files(output):
        if (PART_RE.match(name) and f"{sub}/{name}" not in committed
                and (attempt is None or name.endswith(f"-{attempt}.parquet"))):
            fs.rm(p)
            removed.append(storage.unstrip(fs, p))
    return removed


def _table_files(output: str):
    """(table, fs, path, name) of every file under OUTPUT/captions and OUTPUT/failures."""
    for sub in ("captions", "failures"):
        fs, path = storage.get_fs(storage.join(output, sub))
        if not fs.exists(path):
            continue
        for p in sorted(fs.find(path)):
            yield sub, fs, p, p.rsplit("/", 1)[-1]


def read_table_dir(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All parts under ``uri`` that count (``part_files``) as one table (None if there are none)."""
    files = part_files(uri)
    if not files:
        return None
    fs = storage.get_fs(uri)[0]
    tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in files]
    return pa.concat_tables(tables, promote_options="default")


def quarantine_damaged(output: str) -> list[str]:
    """Rename every unreadable Parquet part under OUTPUT/captions and OUTPUT/failures (cut by a
    full disk, damaged by a copy) to a hidden ``.damaged-<name>`` beside it, so neither resume
    nor readers trip over it; its sources are then redone (once: the damaged part is no longer
    read). Called by the caption job under its output lease. Returns the quarantined URIs."""
    moved = []
    for _, fs, p, name in _table_files(output):
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


def captioned_uris(output: str) -> Iterator[pa.Array]:
    """The distinct URIs of each committed caption part, part by part (``source_uri`` only)."""
    fs = storage.get_fs(output)[0]
    for f in part_files(storage.join(output, "captions")):
        yield pc.unique(pq.read_table(f, columns=["source_uri"], filesystem=fs)
                        .column("source_uri").combine_chunks())


def done_uris(output: str) -> pa.Array:
    """The sources a rerun skips, as one Arrow array of distinct URIs: those with captions, and
    those whose failure is permanent. Sources whose only failures are retryable (read errors,
    timeouts) are attempted again. Read part by part, one column (two for failures), each part
    reduced to its distinct URIs first: memory ~ the distinct URIs, ~100 B each (bench/scale.py
    (d): 1M done sources)."""
    found = [pa.array([], pa.string())] + list(captioned_uris(output))
    fs = storage.get_fs(output)[0]
    for f in part_files(storage.join(output, "failures")):
        t = pq.read_table(f, columns=["source_uri", "retryable"], filesystem=fs)
        perm = t.filter(pc.invert(t.column("retryable")))
        found.append(pc.unique(perm.column("source_uri").combine_chunks()))
    return pc.unique(pa.concat_arrays([pc.cast(a, pa.string()) for a in found]))


FAILURE_COLUMNS = ["source_uri", "error_type", "message", "retryable", "run_id"]


def read_failures(output: str, run_id: str = "") -> pa.Table:
    """The committed failure rows of OUTPUT (FAILURE_COLUMNS, in part order), or of one run:
    then only that run's parts are read (their names carry the run id; parts named otherwise
    are read and filtered on ``run_id``). Failure parts are few and small: one per block that
    had a failure."""
    files = part_files(storage.join(output, "failures"))
    if run_id:
        files = [f for f in files if not PART_RE.match(f.rsplit("/", 1)[-1])
                 or f.rsplit("/", 1)[-1].startswith(f"part-{run_id}-b")]
    fs = storage.get_fs(output)[0]
    tables = [pq.read_table(f, columns=FAILURE_COLUMNS, filesystem=fs) for f in files]
    t = pa.concat_tables(tables, promote_options="default") if tables else None
    if t is None:
        return pa.table({c: pa.array([], pa.bool_() if c == "retryable" else pa.string())
                         for c in FAILURE_COLUMNS})
    return t.filter(pc.equal(t.column("run_id"), run_id)) if run_id else t


def failed_sources(output: str, run_id: str = "", later: bool = True) -> pa.Table:
    """One row per source with a failure row (``read_failures``): its last failure row (part
    order: run, then block), plus ``still_failing``: False only for a source whose failures were
    all retryable and that a later run captioned (a retryable failure keeps no windows, so any
    caption row of it is a later run's). Caption parts are read (``source_uri`` only, as
    ``done_uris`` does) only when there are such retryable failures, and ``later`` is True
    (False: ``still_failing`` is True throughout, and no caption part is read)."""
    t = read_failures(output, run_id)
    t = t.append_column("__i", pa.array(np.arange(t.num_rows, dtype=np.int64)))
    g = t.group_by("source_uri").aggregate([("__i", "max"), ("retryable", "min")])
    g = g.take(pc.sort_indices(g, sort_keys=[("__i_max", "ascending")]))
    last = t.take(g.column("__i_max")).drop_columns(["__i"])
    only_retry = g.column("retryable_min").to_numpy(zero_copy_only=False).astype(bool)
    retry = last.column("source_uri").filter(pa.array(only_retry)).combine_chunks()
    captioned = np.zeros(len(retry), bool)
    for uris in captioned_uris(output) if len(retry) and later else []:
        captioned |= pc.is_in(retry, value_set=uris).to_numpy(zero_copy_only=False)
    resolved = np.zeros(last.num_rows, bool)
    resolved[np.flatnonzero(only_retry)] = captioned
    return last.append_column("still_failing", pa.array(~resolved))
