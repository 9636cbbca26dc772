"""Opening layout sources in decode tasks: one decode-input row (loose file, tar member, span,
or a group: a whole ``.tar.gz`` shard / one Parquet row group) -> ``(source_uri, Located)``
pairs whose ``open()`` gives a seekable file object (``iter_sources``)."""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow.parquet as pq

from overheard import storage
from overheard.layouts.listing import SPOOL_BYTES, _is_store_error, _open_parquet
from overheard.media import MediaError
from overheard.schema import read_error_type


class SubFile(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of a seekable file object, as a seekable read-only
    file: a tar member opened in place (the shard is never read whole; with s3fs each read is a
    ranged GET). ``size`` and ``name`` are what the decoder reports."""

    def __init__(self, f, offset: int, length: int, name: str):
        super().__init__()
        self._f, self._off, self.size, self.name = f, offset, length, name
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        left = self.size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self._f.seek(self._off + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


@dataclass
class Located:
    """How a decode task reaches one source: ``open()`` -> seekable binary file object (or raises
    MediaError for a source the listing or the group read found unreadable); ``version_uri``: the
    object whose version is the source's (the shard, the Parquet file, the media file);
    ``start_s``/``end_s``: the span to caption (end None: to the end); ``meta``: source_meta."""

    open: Callable[[], object]
    version_uri: str
    start_s: float = 0.0
    end_s: float | None = None
    meta: str | None = None


def _raiser(error_type: str, message: str):
    def f():
        raise MediaError(error_type, message)
    return f


def _open_tar_member(container: str, size: int, offset: int, length: int, name: str):
    """The member as a SubFile. On object stores: read-ahead no larger than the member (min 64
    KiB; a 200-KB clip is one ranged GET, not 8 MiB) and the shard's size from the listing, so
    opening costs no HEAD request (measured: bench/layouts.py)."""
    fs, path = storage.get_fs(container)
    if storage.protocol_of(container) == "file":
        f = open(path, "rb")
    else:
        f = fs.open(path, "rb", block_size=min(8 << 20, max(length, 64 << 10)),
                    cache_type="readahead", **({"size": size} if size and size > 0 else {}))
    return SubFile(f, offset, length, name)


def iter_sources(uri: str, loc: dict | None) -> Iterator[tuple[str, Located | None]]:
    """``(source_uri, Located)`` for one decode-input row: one pair for a loose file (Located
    None), tar member, span or listing failure; one per member for a group (tgz shard streamed
    once, holding one member at a time; hf row group read once). Lazy: a group advances only as
    its members are consumed."""
    if not loc:
        yield uri, None
        return
    kind, c = loc["kind"], loc["container"]
    if kind == "fail":
        yield uri, Located(_raiser(loc["error_type"], loc["message"]), c, meta=loc["meta"])
    elif kind == "tar":
        yield uri, Located(lambda: _open_tar_member(c, loc["container_size"], loc["offset"],
                                                    loc["length"], uri), c, meta=loc["meta"])
    elif kind == "span":
        end = loc["end_s"]
        yield uri, Located(lambda: storage.open_input(c), c, start_s=loc["start_s"],
                           end_s=None if end is None or end < 0 else end, meta=loc["meta"])
    elif kind == "tgz":
        yield from _iter_tgz(c, loc["members"])
    elif kind == "hf":
        yield from _iter_hf(c, int(loc["offset"]), loc["members"])
    else:
        yield uri, Located(_raiser("unsupported", f"unknown locator kind {kind!r}"), c)


def _iter_tgz(shard: str, members: list[dict]) -> Iterator[tuple[str, Located]]:
    todo = {m["name"]: m for m in members}
    err: BaseException | None = None
    try:
        with storage.open_input(shard) as f, tarfile.open(fileobj=f, mode="r|gz") as tf:
            for ti in tf:
                m = todo.pop(ti.name, None) if ti.isfile() else None
                if m is None:
                    continue
                spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
                try:
                    shutil.copyfileobj(tf.extractfile(ti), spool, 1 << 20)
                except Exception as e:  # noqa: BLE001 - this member's bytes are cut: its failure
                    spool.close()
                    todo[ti.name] = m
                    raise e
                spool.seek(0)
                # the decoder closes the spool when done with it; closing again is a no-op
                yield m["uri"], Located(lambda s=spool: s, shard, meta=m["meta"])
                spool.close()
                if not todo:
                    break
    except Exception as e:  # noqa: BLE001 - gzip/tar damage or the store failing mid-stream
        err = e
    for m in sorted(todo.values(), key=lambda m: m["index"]):
        if err is None:
            et, msg = "corrupt", f"member {m['name']} not found when streaming the shard"
        else:
            et = read_error_type(err) if _is_store_error(err) else "truncated"
            msg = f"shard stream failed before member {m['name']}: {type(err).__name__}: {err}"
        yield m["uri"], Located(_raiser(et, msg), shard, meta=m["meta"])


def _named_bytes(data: bytes, name: str) -> io.BytesIO:
    f = io.BytesIO(data)
    f.name = name  # what the decoder's messages call it
    return f


def _iter_hf(uri: str, rg: int, members: list[dict]) -> Iterator[tuple[str, Located]]:
    try:
        with _open_parquet(uri) as f:
            col = pq.ParquetFile(f).read_row_group(rg, columns=["audio"]).column("audio")
            rows = col.to_pylist()
    except Exception as e:  # noqa: BLE001 - a damaged row group: each of its rows fails once
        et = read_error_type(e) if _is_store_error(e) else "corrupt"
        for m in members:
            yield m["uri"], Located(_raiser(et, f"row group {rg} unreadable: "
                                                f"{type(e).__name__}: {e}"), uri, meta=m["meta"])
        return
    for m in members:
        i = int(m["index"])
        audio = rows[i] if 0 <= i < len(rows) else None
        data = (audio or {}).get("bytes")
        if data is None:
            # a row that only names a path on its author's machine: never fetched or opened
            yield m["uri"], Located(_raiser(
                "no_audio_track", f"row has no embedded audio bytes (path "
                                  f"{(audio or {}).get('path')!r} is not followed)"), uri,
                meta=m["meta"])
        else:
            yield m["uri"], Located(lambda d=data, u=m["uri"]: _named_bytes(d, u), uri,
                                    meta=m["meta"])
    del rows
