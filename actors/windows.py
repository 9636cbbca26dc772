"""CPU stage: read a source object and cut its audio into windows.

Columns in (one row per source, batch_size=1):
    source_uri: str, source_version: str
Columns out (one row per window, plus one failure row for a source that fails): the window row
of ``overheard.schema`` (``WINDOW_FIELDS``: source_uri, source_version, window_index (-1 on a
failure row), start_s, end_s, valid_samples, pad_mode, n_windows (on the source's last window),
error_type/error_message/stage ("" unless a failure row), windows_kept, source_meta, has_frame)
plus
    samples: large_binary      the window's real samples only (valid_samples float32, mono, CLAP
                               rate): no padding crosses the object store; models pad once
With ``frame_size`` > 0 (the caption job's ``audio+image`` mode) each window row also carries
    frame: large_binary        uint8 RGB frame_size x frame_size x 3 at the window's midpoint, or
                               b"" when the source has no usable video there (the window is then
                               captioned from audio alone; the job never fails a source for it);
                               ``has_frame`` says which
In ``audio`` mode the column is absent (has_frame False) and no video is decoded at all.
Archive layouts (overheard.layouts): the input may also carry ``locator`` (struct, see there): a
tar member, a span of a file, or a group (a .tar.gz shard, a Parquet row group) that expands
into one source per member; every window row then carries ``source_meta`` (JSON string or null).
A source ends with exactly one terminal row (its last window, or its failure row), which lets
the writer know when every window of a source has arrived, whatever order they come in.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from overheard import storage
from overheard.layouts import Located, iter_sources
from overheard.media import MediaError, decode_windows
from overheard.schema import (failure_row, read_error_type, window_row as _window_row,
                              window_table)

# Windows per yielded table: 8 x 10 s x 48 kHz x 4 B = 15 MB (at most 15 windows, 29 MB, when
# short sources precede a long one), well under Ray Data's 128 MiB block target, so a 2-hour
# source streams out in ~90 small pieces instead of one 1.4 GB block.
WINDOWS_PER_YIELD = 8


class _Frames:
    """Frames for one source, fetched per yielded group of windows (8 midpoints per call: one
    seek walk, overheard.frames). The source is opened once and kept open for all its groups (an
    hour of video is 45 groups: no re-open, no new S3 connection each time; read_frames rewinds
    it). The first failure (no video track, corrupt video) is remembered: later groups of that
    source skip video entirely and carry b""."""

    def __init__(self, uri: str, size: int, timeout_s: float | None):
        self.uri, self.size, self.timeout_s = uri, size, timeout_s
        self.failed = ""
        self.f = None

    def attach(self, rows: list[dict]) -> None:
        from overheard.frames import read_frames

        wins = [r for r in rows if r["window_index"] >= 0]
        for r in rows:
            r["frame"] = b""
        if not wins or self.failed:
            return
        try:
            if self.f is None:
                self.f = storage.open_input(self.uri)
            frames = read_frames(self.f, [(r["start_s"] + r["end_s"]) / 2 for r in wins],
                                 size=self.size, timeout_s=self.timeout_s)
            for r, fr in zip(wins, frames):
                r["frame"] = np.ascontiguousarray(fr).tobytes()
        except Exception as e:  # MediaError (no_video_track, corrupt, ...) or the store failing
            self.failed = getattr(e, "error_type", type(e).__name__)
            self.close()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class IOGuard:
    """File-object wrapper that remembers any exception the store raised in read/seek and
    re-raises it as OSError. Whatever the decoder then makes of the failed read (FFmpeg may
    report it as a parse or decode error), the source is classified ``read_error`` and
    retried on the next run, instead of being recorded as corrupt or truncated media."""

    def __init__(self, f):
        self._f = f
        self.error: BaseException | None = None

    def _guard(self, fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
            self.error = e
            if isinstance(e, OSError):
                raise
            raise OSError(f"{type(e).__name__}: {e}") from e

    def read(self, n: int = -1) -> bytes:
        return self._guard(self._f.read, n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard(self._f.seek, offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()

    def __getattr__(self, name):  # size, path, name: metadata the decoder may use
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def source_windows(uri: str, version: str, *, window_s: float, hop_s: float | None,
                   min_window_s: float, pad_mode: str, max_duration_s: float | None,
                   timeout_s: float | None, located: Located | None = None) -> Iterator[dict]:
    """Rows for one source: its windows, the last one flagged with ``n_windows``, or windows
    then a failure row. Never raises for bad input. ``located``: how to open a source of an
    archive layout (tar member, span, Parquet row; overheard.layouts), else ``uri`` is opened."""
    vuri = located.version_uri if located is not None else uri
    def window_row(w, n_windows=-1):
        return _window_row(uri, version, w.index, w.start_s, w.end_s, w.samples, pad_mode,
                           n_windows)

    started = time.monotonic()  # the decode deadline covers opening too
    got = yield from _open_source(uri, version, located, vuri)
    if got is None:
        return
    f, opened = got
    if timeout_s is not None:
        # a slow open spends the same budget; a tiny positive rest still times out cleanly
        timeout_s = max(timeout_s - (time.monotonic() - started), 1e-6)
    span = {} if located is None else dict(start_s=located.start_s, end_s=located.end_s)
    got = yield from _decoded(f, uri, version, vuri, opened, window_row, dict(
        window_s=window_s, hop_s=hop_s, min_window_s=min_window_s,
        max_duration_s=max_duration_s, timeout_s=timeout_s, **span))
    if got is None:
        return
    pending, count = got
    if pending is None:
        yield failure_row(uri, version, "decode", "no_audio_samples", "no audio decoded")
        return
    now = current_version(vuri) if version else opened
    if now != opened:
        # The object was rewritten while we read it: the windows may mix two versions.
        # Retryable, so the sink discards them and a rerun captions the new version whole.
        yield window_row(pending)
        yield failure_row(uri, version, "read", "changed",
                          f"source changed while being read (version {opened} -> {now})",
                          windows_kept=count)
        return
    yield window_row(pending, n_windows=count)


def _open_source(uri: str, version: str, located: Located | None, vuri: str):
    """Open one source for ``source_windows``: returns (IOGuard, the version actually opened),
    or yields the source's failure row and returns None."""
    refused = refuse_source(uri)
    if refused:
        yield failure_row(uri, version, "read", *refused)
        return None
    try:
        f = IOGuard(storage.open_input(uri) if located is None else located.open())
        # what was actually opened (a link's target, the object's own version): compared with
        # the version at the end, so a manifest-supplied version (an S3 VersionId) or a link
        # older than its target never looks "changed"
        opened = current_version(vuri) if version else ""
    except MediaError as e:  # a layout source the listing/group read found unreadable
        yield failure_row(uri, version, "read", e.error_type, e.message)
        return None
    except storage.NotARegularFile as e:
        yield failure_row(uri, version, "read", "not_a_file", str(e))
        return None
    except Exception as e:  # permissions, missing object, network: worth a retry later
        yield failure_row(uri, version, "read", read_error_type(e),
                          f"cannot open: {type(e).__name__}: {e}")
        return None
    return f, opened


def _decoded(f: IOGuard, uri: str, version: str, vuri: str, opened: str, window_row,
             decode_kwargs: dict):
    """Decode an opened source (closing it): yields each window's row once the next window is
    decoded (a one-window lookahead, so the last can carry n_windows) and returns (last window
    or None, windows decoded); on a failure yields the windows so far and the failure row, and
    returns None."""
    pending = None
    count = 0
    try:
        with f:
            for w in decode_windows(f, **decode_kwargs):
                if pending is not None:
                    yield window_row(pending)
                pending = w
                count += 1
    except MediaError as e:
        if pending is not None:
            yield window_row(pending)
        if f.error is not None:  # the store failed, not the media
            yield failure_row(uri, version, "read", read_error_type(f.error),
                              f"read failed after {count} windows: {type(f.error).__name__}: "
                              f"{f.error}", windows_kept=count)
        elif version and (now := current_version(vuri)) != opened:
            # a file rewritten mid-read often looks truncated or corrupt; it is neither
            yield failure_row(uri, version, "read", "changed",
                              f"source changed while being read (version {opened} -> {now}); "
                              f"decoder said: {e}", windows_kept=count)
        else:
            yield failure_row(uri, version, "decode", e.error_type, str(e), windows_kept=count)
        return None
    except (OSError, IOError) as e:  # the object store went away mid-read
        if pending is not None:
            yield window_row(pending)
        yield failure_row(uri, version, "read", read_error_type(e),
                          f"read failed after {count} windows: {type(e).__name__}: {e}",
                          windows_kept=count)
        return None
    except Exception as e:  # a decoder bug must not stop the job; record it
        if pending is not None:
            yield window_row(pending)
        # MemoryError: the worker's fault, not the file's -> retryable, never a permanent row
        oom = isinstance(e, MemoryError)
        yield failure_row(uri, version, "decode", "out_of_memory" if oom else "corrupt",
                          f"unexpected {type(e).__name__} after {count} windows: {e}",
                          windows_kept=count)
        return None
    return pending, count


def current_version(uri: str) -> str:
    """The object's version now (ETag or mtime:size), or "" if it cannot be checked."""
    try:
        if storage.protocol_of(uri) == "file":
            return storage.stat_version(storage.local_stat(uri))  # a link's target
        fs, path = storage.get_fs(uri)
        fs.invalidate_cache(path)
        return storage.version_of(fs.info(path))
    except Exception:
        return "unavailable"


# Where a source may come from. Anything else named by a manifest (http://, ftp://, memory://,
# chained "zip::", ...) would make a decode worker fetch or resolve it: refused as unsupported.
SOURCE_PROTOCOLS = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def refuse_source(uri: str) -> tuple[str, str] | None:
    """(error_type, message) when ``uri`` must not be opened at all, decided without opening
    it (stat, never open: opening a FIFO blocks until a writer appears); else None."""
    proto = storage.protocol_of(uri)
    if proto not in SOURCE_PROTOCOLS or "::" in uri:
        return ("unsupported", f"URL scheme {proto!r} is not a source location "
                               f"(allowed: {', '.join(SOURCE_PROTOCOLS)})")
    if proto == "file":
        try:
            what = storage.special_file(storage.local_stat(uri))
        except OSError:
            return None  # missing / broken link: open() reports it as read_error
        if what:
            return ("not_a_file", f"{uri}: not a regular file ({what}); only regular files "
                                  "(or links to them) are sources")
    return None


# Object-store stats run this many at a time (a HEAD request each, ~10-50 ms of waiting).
STAT_THREADS = 8


def _size_of(uri: str) -> int:
    """Bytes of one loose source (following links); FileNotFoundError when it does not exist."""
    if storage.protocol_of(uri) == "file":
        return storage.local_stat(uri).st_size
    fs, path = storage.get_fs(uri)
    return int(fs.info(path).get("size") or 0)


def _stat(uri: str):
    try:
        return _size_of(uri)
    except Exception as e:  # noqa: BLE001 - FileNotFoundError or the store failing
        return e


def stat_unknown(batch: pa.Table, budget: int) -> tuple[pa.Table, dict, list[dict]]:
    """Split a decode block before any source is opened: (the rows to decode now, {uri: message}
    of the missing ones among them, the deferred sources). Columns in: source_uri,
    source_version, size (int64, <= 0: unknown; absent: all known), locator (optional).
    Loose sources of unknown size are stat'ed (no open; STAT_THREADS at a time on an object
    store); a missing one stays in the block to become its ``not_found`` row, decided here. Then
    sources are kept in order while the block's known bytes fit ``budget`` (the first one
    always; a smaller one later may still fit); the rest are deferred, as {source_uri,
    source_version, size} for the job's next round, which packs them by their now known sizes.
    ``budget`` <= 0: nothing is stat'ed."""
    if budget <= 0 or "size" not in batch.column_names or not batch.num_rows:
        return batch, {}, []
    uris = batch.column("source_uri").to_pylist()
    sizes = batch.column("size").to_pylist()
    locs = (batch.column("locator").is_null().to_pylist() if "locator" in batch.column_names
            else [True] * len(uris))
    # a URL refuse_source refuses (http://, chained "zip::") is never touched, not even stat'ed
    ask = [i for i, (n, loose) in enumerate(zip(sizes, locs)) if loose and (n or 0) <= 0
           and storage.protocol_of(uris[i]) in SOURCE_PROTOCOLS and "::" not in uris[i]]
    remote = any(storage.protocol_of(uris[i]) != "file" for i in ask)
    if remote and len(ask) > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(STAT_THREADS, len(ask))) as pool:
            got = list(pool.map(_stat, [uris[i] for i in ask]))
    else:
        got = [_stat(uris[i]) for i in ask]
    gone = {}
    for i, g in zip(ask, got):
        if isinstance(g, FileNotFoundError):
            gone[uris[i]] = f"no such file (stat before opening): {g}"
        elif isinstance(g, int):
            sizes[i] = g
    keep, deferred, used = [], [], 0
    versions = batch.column("source_version").to_pylist()
    for i, u in enumerate(uris):
        n = 0 if u in gone else max(sizes[i] or 0, 0)
        if u in gone or not keep or used + n <= budget:  # a missing one fails here, now
            keep.append(i)
            used += n
        else:
            deferred.append(dict(source_uri=u, source_version=versions[i] or "", size=n))
    return (batch.take(keep) if deferred else batch), gone, deferred


def decode_sources(batch: pa.Table, *, window_s: float = 10.0, hop_s: float | None = None,
                   min_window_s: float = 0.5, pad_mode: str = "repeatpad",
                   max_duration_s: float | None = None, timeout_s: float | None = None,
                   frame_size: int = 0, gone: dict | None = None) -> Iterator[pa.Table]:
    """Ray Data generator UDF (batch_format="pyarrow"): sources in, window tables out,
    ``WINDOWS_PER_YIELD`` windows at a time so memory stays flat for hour-long files; short
    sources of one input batch share a table (whole sources only: a source is split only when
    it alone has ``WINDOWS_PER_YIELD`` windows), so 60 packed 10-s clips are a few blocks for
    Ray Data to move, not 60. ``frame_size`` > 0 adds each window's midpoint frame (see the
    module docstring). ``gone``: {uri: message} of sources known missing (``stat_unknown``):
    each becomes its ``not_found`` row without being opened."""
    pending: list[dict] = []  # whole sources (or full groups of a long one) not yet yielded
    for uri, version, located in _sources(batch):
        rows: list[dict] = []
        frames = _Frames(uri, frame_size, timeout_s) if frame_size > 0 else None

        def settle():  # this source's rows so far -> pending, with their frames
            if frames is not None:
                frames.attach(rows)
            pending.extend(rows)
            rows.clear()

        source = (iter([failure_row(uri, version or "", "read", "not_found", gone[uri])])
                  if gone and uri in gone else
                  source_windows(uri, version or "", window_s=window_s, hop_s=hop_s,
                                 min_window_s=min_window_s, pad_mode=pad_mode,
                                 max_duration_s=max_duration_s, timeout_s=timeout_s,
                                 located=located))
        try:
            for row in source:
                row["source_meta"] = located.meta if located is not None else None
                rows.append(row)
                if len(rows) >= WINDOWS_PER_YIELD:
                    settle()
                    yield window_table(pending)
                    pending.clear()
            settle()
        finally:
            if frames is not None:
                frames.close()
        if len(pending) >= WINDOWS_PER_YIELD:
            yield window_table(pending)
            pending.clear()
    if pending:
        yield window_table(pending)


def _sources(batch: pa.Table) -> Iterator[tuple[str, str, Located | None]]:
    """(source_uri, version, Located or None) per source of the input rows; a group row (a
    .tar.gz shard, a Parquet row group) expands lazily into its members, in container order."""
    uris = batch.column("source_uri").to_pylist()
    versions = batch.column("source_version").to_pylist()
    locs = (batch.column("locator").to_pylist() if "locator" in batch.column_names
            else [None] * len(uris))
    for uri, version, loc in zip(uris, versions, locs):
        for member_uri, located in iter_sources(uri, loc):
            yield member_uri, version, located


_table = window_table  # the name tests/test_faults.py imports

__all__ = ["decode_sources", "source_windows", "failure_row", "stat_unknown"]
