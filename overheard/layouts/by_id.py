"""Opening a layout source from its id alone (``overheard serve``'s audio): ``parse_id``,
``span_bounds``, ``open_by_id``; a bounded cache of tar shards' header indexes."""

from __future__ import annotations

import math
import re
import shutil
import tarfile
import tempfile
import threading
from collections import OrderedDict

import pyarrow.parquet as pq

from overheard import storage
from overheard.layouts.listing import (SPOOL_BYTES, TAR_SUFFIXES, TGZ_SUFFIXES, _is_store_error,
                                       _open_parquet, _walk_tar)
from overheard.layouts.opening import _named_bytes, _open_tar_member
from overheard.media import MediaError


# Tar shards whose header index open_by_id keeps (LRU): ~330 B per member (measured with
# tracemalloc, short names), so 32 shards of 1000 members hold ~10 MB; indexing a 1000-member
# shard of 20-KB members took 486 ms on the loopback S3 server, a cached one costs nothing
# (bench/serve_layouts.py).
TAR_INDEX_CACHE = 32
_tar_index: OrderedDict = OrderedDict()
_tar_index_lock = threading.Lock()
_SPAN_ID = re.compile(r"t=\d+(\.\d+)?(,\d+(\.\d+)?)?")


def parse_id(source_uri: str) -> tuple[str, str, str] | None:
    """``(kind, container, rest)`` for a layout source id (kind tar | tgz | hf | span, rest the
    member name / row index / ``t=`` fragment), None for a plain file's URI. The container is
    the part before the first ``#`` that ends like one (a shard or Parquet suffix, or a span
    fragment after it), so a ``#`` inside a member name is kept in the name."""
    i = source_uri.find("#")
    while i >= 0:
        c, rest = source_uri[:i], source_uri[i + 1:]
        low = c.lower()
        if low.endswith(TGZ_SUFFIXES):
            return "tgz", c, rest
        if low.endswith(TAR_SUFFIXES):
            return "tar", c, rest
        if low.endswith(".parquet") and rest.isdigit():
            return "hf", c, rest
        if _SPAN_ID.fullmatch(rest):
            return "span", c, rest
        i = source_uri.find("#", i + 1)
    return None


def span_bounds(source_uri: str) -> tuple[float, float]:
    """``(start, end)`` seconds of file time a source id covers: a JSONL span's ``t=a,b``
    (``t=a`` alone: to the end), ``(0, inf)`` for anything else."""
    parsed = parse_id(source_uri)
    if parsed is None or parsed[0] != "span":
        return 0.0, math.inf
    a, _, b = parsed[2][2:].partition(",")
    return float(a), float(b) if b else math.inf


def _tar_members(shard: str) -> tuple[dict[str, tuple[int, int]], int]:
    """{member name: (data offset, size)} of a .tar shard and its size, cached per shard
    version (one HEAD per call: a replaced shard is re-indexed, never read at stale offsets)."""
    fs, path = storage.get_fs(shard)
    info = fs.info(path)
    size = int(info.get("size") or 0)
    key = (shard, storage.version_of(info), size)
    with _tar_index_lock:
        if key in _tar_index:
            _tar_index.move_to_end(key)
            return _tar_index[key], size
    with (open(path, "rb") if storage.protocol_of(shard) == "file"
          else fs.open(path, "rb", block_size=1 << 20, cache_type="readahead",
                       **({"size": size} if size else {}))) as f:
        # tarfile "r:" seeks over member data: headers only, as index_shard reads them
        entries, err = _walk_tar(tarfile.open(fileobj=f, mode="r:"), lambda ti: False, ())
    if err is not None and _is_store_error(err):
        raise err  # the store failing: nothing cached, the next request tries again
    members = {ti.name: (ti.offset_data, ti.size) for ti, _ in entries}
    with _tar_index_lock:
        _tar_index[key] = members
        while len(_tar_index) > TAR_INDEX_CACHE:
            _tar_index.popitem(last=False)
    return members, size


def _open_tgz_member(shard: str, name: str, uri: str):
    with storage.open_input(shard) as f, tarfile.open(fileobj=f, mode="r|gz") as tf:
        for ti in tf:
            if ti.isfile() and ti.name == name:
                spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
                try:
                    shutil.copyfileobj(tf.extractfile(ti), spool, 1 << 20)
                except BaseException:
                    spool.close()
                    raise
                spool.seek(0)
                return spool
    raise FileNotFoundError(f"{uri}: member not in the shard")


def _open_hf_row(container: str, row: int, uri: str):
    with _open_parquet(container) as f:
        pf = pq.ParquetFile(f)
        first = 0
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if row < first + n:
                audio = pf.read_row_group(rg, columns=["audio"]).column("audio")[row - first]
                audio = audio.as_py() or {}
                break
            first += n
        else:
            raise FileNotFoundError(f"{uri}: no such row")
    if audio.get("bytes") is None:  # as _iter_hf: a path alone is never followed
        raise MediaError("no_audio_track", "row has no embedded audio bytes")
    return _named_bytes(audio["bytes"], uri)


def open_by_id(source_uri: str):
    """A seekable file object with the bytes the caption job decoded for ``source_uri``, found
    from the id alone (``overheard serve``'s audio); None when the id is a plain file's URI
    (open it with ``storage.open_input``). Opens only the container the id names:

    * tar member: the shard's header index (cached, see :func:`_tar_members`), then the member
      in place with ranged reads (:class:`SubFile`);
    * .tar.gz member: the shard streamed up to the member, which is spooled;
    * HF Parquet row: the ``audio`` column of the row's row group only;
    * span: the plain file (window times are already in file time).

    Raises FileNotFoundError for a member/row the container no longer has, MediaError for a row
    without embedded bytes or a damaged container, OSError when the store fails."""
    parsed = parse_id(source_uri)
    if parsed is None:
        return None
    kind, c, rest = parsed
    try:
        if kind == "span":
            return storage.open_input(c)
        if kind == "hf":
            return _open_hf_row(c, int(rest), source_uri)
        if kind == "tgz":
            return _open_tgz_member(c, rest, source_uri)
        members, size = _tar_members(c)
        if rest not in members:
            raise FileNotFoundError(f"{source_uri}: member not in the shard")
        offset, length = members[rest]
        return _open_tar_member(c, size, offset, length, source_uri)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - bad bytes (tar/gzip/Parquet damage) vs store errors
        if _is_store_error(e):
            raise
        raise MediaError("corrupt", f"{kind} container unreadable: {type(e).__name__}") from e
