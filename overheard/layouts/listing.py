"""Listing archive layouts (driver, metadata only): WebDataset tar shards, Hugging Face Parquet
with embedded audio and JSONL manifests -> sources ``(source_uri, version, size, locator)``
(``list_located``, ``expand``), the locator struct (``LOCATOR_TYPE``) and the suffixes. See
``overheard.layouts`` for ids and locator keys."""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from overheard import storage
from overheard.schema import read_error_type


TAR_SUFFIXES = (".tar",)
TGZ_SUFFIXES = (".tar.gz", ".tgz")
SHARD_SUFFIXES = TAR_SUFFIXES + TGZ_SUFFIXES
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
# What a folder listing must also return for expand(): shards and (maybe HF) Parquet files.
CONTAINER_SUFFIXES = SHARD_SUFFIXES + (".parquet",)
# Companion members (.json, .txt, .cls, ...) up to this size go into source_meta; a larger one is
# named there with its size only (WebDataset metadata members are typically < 1 KB).
COMPANION_MAX_BYTES = 64 << 10
# Shards indexed in parallel by the driver: one ranged read per member header on S3 (~10-30 ms
# each) would make a 1000-member shard take ~20 s serially.
INDEX_THREADS = 16
# A .tar.gz member larger than this is spooled to a temp file instead of memory.
SPOOL_BYTES = 64 << 20
# tar pads its end to a 10240-byte record; more unread bytes than this after the last header
# the walk could read means the headers broke part-way (tarfile stops silently there).
TAR_TAIL_BYTES = 10240
# Packing estimate for a span whose file size is unknown: 16 kB/s (128 kbit/s).
SPAN_BYTES_PER_S = 16_000


def fmt_s(x: float) -> str:
    """Seconds as they appear in a span id: up to 6 decimals, no trailing zeros (12.5, 3, 0.25)."""
    s = f"{float(x):.6f}".rstrip("0").rstrip(".")
    return s if s not in ("", "-0") else "0"


def _loc(kind: str, container: str, **kw) -> dict:
    loc = dict(kind=kind, container=container, container_size=-1, offset=0, length=-1,
               start_s=0.0, end_s=-1.0, meta=None, error_type="", message="", members=[])
    loc.update(kw)
    return loc


def _member(uri: str, index: int = 0, length: int = -1, meta: str | None = None,
            name: str = "") -> dict:
    return dict(uri=uri, name=name, index=index, length=length, meta=meta)


def _fail(uri: str, version: str, error_type: str, message: str) -> tuple:
    return (uri, version, 0, _loc("fail", uri, error_type=error_type, message=message[:2000]))


def _dumps(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)


# ------------------------------------------------------------------------------------ tar shards

def wds_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name into (key, extension): the key is everything up to the
    first dot of the base name (``dir/sample001.flac`` -> ``dir/sample001``, ``flac``)."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext


def _companion_value(ext: str, data: bytes):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {"bytes": len(data), "note": "not UTF-8"}
    if ext.lower().endswith("json"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _group_members(entries: list[tuple[tarfile.TarInfo, bytes | None]], shard: str,
                   suffixes: tuple[str, ...]) -> list[tuple[str, tarfile.TarInfo, str | None]]:
    """(uri, media TarInfo, source_meta JSON) for each media member of a shard, companions (same
    key, other extension) folded into its meta."""
    comps: dict[str, dict] = {}
    for ti, data in entries:
        if ti.name.lower().endswith(suffixes):
            continue
        key, ext = wds_key(ti.name)
        comps.setdefault(key, {})[ext] = (
            _companion_value(ext, data) if data is not None else {"bytes": ti.size})
    out = []
    for ti, _ in entries:
        if not ti.name.lower().endswith(suffixes):
            continue
        key, ext = wds_key(ti.name)
        c = comps.get(key)
        meta = _dumps(dict(c, __key__=key)) if c else None
        out.append((f"{shard}#{ti.name}", ti, meta))
    return out


def _walk_tar(tf: tarfile.TarFile, want_data: Callable[[tarfile.TarInfo], bool],
              suffixes: tuple[str, ...]) -> tuple[list, BaseException | None]:
    """Iterate a tar's regular members, reading companion data as it goes; an exception part-way
    is returned (members before it are kept)."""
    entries = []
    try:
        for ti in tf:
            if not ti.isfile():
                continue  # directories, links, devices: never sources, never followed
            data = None
            if want_data(ti) and not ti.name.lower().endswith(suffixes):
                data = tf.extractfile(ti).read()
            entries.append((ti, data))
    except Exception as e:  # noqa: BLE001 - tarfile/zlib/store errors, all end the walk
        return entries, e
    return entries, None


def index_shard(uri: str, version: str, size: int, suffixes: tuple[str, ...]) -> list[tuple]:
    """Sources of one tar / tar.gz shard: ``(member uri, shard version, bytes, locator)``.

    ``.tar``: member headers are read with ranged reads, seeking over member data (tarfile in
    ``r:`` mode seeks; a 1 MiB read-ahead serves small members' headers and companions in one
    request). ``.tar.gz`` cannot seek: the shard is streamed once here (``r|gz``) to name its
    members. Unreadable shard -> one ``fail`` source for the shard; headers broken part-way ->
    the members before the break plus one ``fail`` source for the shard."""
    gz = uri.lower().endswith(TGZ_SUFFIXES)
    try:
        fs, path = storage.get_fs(uri)
        f = (open(path, "rb") if storage.protocol_of(uri) == "file"
             else fs.open(path, "rb", block_size=1 << 20, cache_type="readahead"))
    except Exception as e:  # noqa: BLE001
        return [_fail(uri, version, read_error_type(e),
                      f"cannot open shard: {type(e).__name__}: {e}")]
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|gz" if gz else "r:")
        except Exception as e:  # noqa: BLE001 - not a tar / gzip at all, or empty
            etype = read_error_type(e) if _is_store_error(e) else (
                "empty_file" if size == 0 else "corrupt")
            return [_fail(uri, version, etype, f"unreadable shard: {type(e).__name__}: {e}")]
        entries, err = _walk_tar(tf, lambda ti: ti.size <= COMPANION_MAX_BYTES, suffixes)
        end = tf.offset
    out = []
    for i, (muri, ti, meta) in enumerate(_group_members(entries, uri, suffixes)):
        if gz:  # offset: position in the stream (the order the decode task meets them)
            out.append((muri, version, ti.size, _loc("tgz", uri, offset=i, meta=meta,
                                                     length=ti.size, message=ti.name)))
        else:
            out.append((muri, version, ti.size, _loc("tar", uri, offset=ti.offset_data,
                                                     length=ti.size, meta=meta,
                                                     container_size=size)))
    last = entries[-1][0].name if entries else "(none)"
    if err is not None:
        etype = read_error_type(err) if _is_store_error(err) else "corrupt"
        out.append(_fail(uri, version, etype, f"shard unreadable after member {last} "
                         f"({len(entries)} members listed): {type(err).__name__}: {err}"))
    elif not gz and size and size - end > TAR_TAIL_BYTES:
        out.append(_fail(uri, version, "corrupt",
                         f"tar headers unreadable after member {last} at byte {end} of {size}: "
                         f"{size - end} bytes not listed"))
    return out


def _is_store_error(e: BaseException) -> bool:
    """True for the store failing (retryable: OSError, botocore/aiohttp errors), False for bad
    bytes (permanent: tar/gzip/zlib/Parquet format errors)."""
    return not isinstance(e, (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile,
                              pa.ArrowException, ValueError, UnicodeDecodeError))


# ------------------------------------------------------------------------ Parquet embedded audio

def is_hf_audio(schema: pa.Schema) -> bool:
    """The Hugging Face datasets audio layout: an ``audio`` column of struct{bytes, path}."""
    i = schema.get_field_index("audio")
    if i < 0 or not pa.types.is_struct(schema.field(i).type):
        return False
    t = schema.field(i).type
    j = t.get_field_index("bytes")
    return j >= 0 and (pa.types.is_binary(t.field(j).type) or
                       pa.types.is_large_binary(t.field(j).type))


def _scalar_columns(schema: pa.Schema) -> list[str]:
    """Columns copied into source_meta: plain scalars (transcripts, labels, ids), never bytes."""
    keep = []
    for f in schema:
        t = f.type
        if f.name == "audio" or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            continue
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) \
                or pa.types.is_floating(t) or pa.types.is_boolean(t):
            keep.append(f.name)
    return keep


def _open_parquet(uri: str):
    fs, path = storage.get_fs(uri)
    if storage.protocol_of(uri) == "file":
        return open(path, "rb")
    return fs.open(path, "rb", block_size=1 << 20, cache_type="readahead")


def index_hf_parquet(uri: str, version: str, size: int) -> list[tuple]:
    """One source per row, ``<uri>#<row>``, grouped by row group (locator kind ``hf``: one decode
    row per row group, so a task reads only its row group). Reads the footer and the small
    columns (``audio.path`` and scalar columns, for source_meta), never the audio bytes."""
    try:
        with _open_parquet(uri) as f:
            pf = pq.ParquetFile(f)
            if not is_hf_audio(pf.schema_arrow):
                return [_fail(uri, version, "unsupported",
                              "Parquet file has no 'audio' struct{bytes, path} column")]
            cols = ["audio.path"] + _scalar_columns(pf.schema_arrow)
            out, row = [], 0
            for rg in range(pf.metadata.num_row_groups):
                small = pf.read_row_group(rg, columns=cols).to_pylist()
                rg_bytes = pf.metadata.row_group(rg).total_byte_size
                for i, r in enumerate(small):
                    meta = {k: v for k, v in r.items() if k != "audio" and v is not None}
                    meta["path"] = (r.get("audio") or {}).get("path")
                    n = rg_bytes // max(len(small), 1)
                    out.append((f"{uri}#{row}", version, n,
                                _loc("hf", uri, offset=rg, length=i, meta=_dumps(meta))))
                    row += 1
            return out
    except Exception as e:  # noqa: BLE001 - unreadable footer, truncated file, store error
        etype = read_error_type(e) if _is_store_error(e) else (
            "empty_file" if size == 0 else "corrupt")
        return [_fail(uri, version, etype, f"unreadable Parquet file: {type(e).__name__}: {e}")]


def parquet_is_hf(uri: str) -> bool | None:
    """True when the Parquet file at ``uri`` has the HF audio column (reads the footer only),
    False for other tables (URI manifests), None when the footer cannot be read."""
    try:
        with _open_parquet(uri) as f:
            return is_hf_audio(pq.ParquetFile(f).schema_arrow)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------- JSONL manifests

def read_jsonl(uri: str) -> list[tuple]:
    """Sources of a NeMo-style JSONL manifest: one JSON object per line with ``audio_filepath``
    (absolute, URI, or relative to the manifest's folder), optional ``offset`` and ``duration``
    (seconds). Lines with a span become ``<file>#t=<offset>,<end>`` (locator kind ``span``);
    other keys of the line go into source_meta. A malformed line is one failure source
    ``<manifest uri>#line=<n>`` (permanent); identical lines collapse to one source."""
    out: dict[str, tuple] = {}
    for chunk in iter_jsonl(uri):
        for s in chunk:
            out.setdefault(s[0], s)
    return sorted(out.values(), key=lambda s: s[0])


# Lines of a JSONL manifest turned into sources at a time (the caption job's listing consumes a
# 10M-line manifest in such chunks; one chunk of short lines is ~30 MB of Python objects).
JSONL_CHUNK_LINES = 65536


def _lines(f) -> Iterator[tuple[int, bytes]]:
    """(line number, line) as ``bytes.splitlines`` numbers them, read a line at a time."""
    n = 0
    for raw in f:
        for line in raw.splitlines():
            n += 1
            yield n, line


def iter_jsonl(uri: str, chunk_lines: int = JSONL_CHUNK_LINES) -> Iterator[list[tuple]]:
    """:func:`read_jsonl`'s sources in file order, one per line (blank lines skipped),
    ``chunk_lines`` lines at a time (the file is streamed, never read whole). Repeated lines are
    NOT collapsed here: the caption job's listing (jobs/sources.py) dedups across chunks, first
    entry winning, and counts the repeats as ``sources_duplicate`` as it does for CSV/Parquet
    manifests; :func:`read_jsonl` collapses them itself."""
    base = (os.path.dirname(os.path.abspath(uri)) if storage.protocol_of(uri) == "file"
            else uri.rsplit("/", 1)[0])
    out: list[tuple] = []
    with storage.open_input(uri) as f:
        for n, raw in _lines(f):
            if len(out) >= chunk_lines:
                yield out
                out = []
            _jsonl_line(out, uri, base, n, raw)
    if out:
        yield out


def _jsonl_line(out: list, uri: str, base: str, n: int, raw: bytes) -> None:
    """Append line ``n`` of manifest ``uri``'s source to ``out``. A line naming only a file (no
    offset/duration, no other keys for source_meta) is a loose source (null locator, id the
    file's URI), stat'ed and deferred by the decode task like a CSV row
    (actors.windows.stat_unknown); a line with a span or other keys gets a ``span`` locator."""
    line = raw.strip()
    if not line:
        return
    try:
        rec = json.loads(line)
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        fp = rec.get("audio_filepath")
        if not isinstance(fp, str) or not fp:
            raise ValueError("no 'audio_filepath'")
        off = float(rec.get("offset") or 0.0)
        dur = rec.get("duration")
        dur = None if dur is None else float(dur)
        if off < 0 or (dur is not None and dur <= 0) or off != off or (dur is not None and dur != dur):
            raise ValueError(f"bad span offset={rec.get('offset')!r} duration={dur!r}")
    except (ValueError, TypeError) as e:
        u = f"{uri}#line={n}"
        out.append(_fail(u, "", "corrupt", f"manifest line {n}: {e}"))
        return
    file_uri = fp if ("://" in fp or fp.startswith("/")) else storage.join(base, fp)
    version = str(rec.get("version") or "")
    meta = {k: v for k, v in rec.items()
            if k not in ("audio_filepath", "offset", "duration", "version")}
    meta = _dumps(meta) if meta else None
    if off == 0 and dur is None:
        size = _line_size(rec.get("size"))
        out.append((file_uri, version, size) if meta is None else
                   (file_uri, version, size, _loc("span", file_uri, meta=meta)))
        return
    end = -1.0 if dur is None else off + dur
    sid = f"{file_uri}#t={fmt_s(off)}" + ("" if dur is None else f",{fmt_s(end)}")
    est = int((dur if dur is not None else 600.0) * SPAN_BYTES_PER_S)
    out.append((sid, version, est, _loc("span", file_uri, start_s=off, end_s=end, meta=meta)))


def _line_size(n) -> int:
    """A JSONL line's ``size`` as bytes; 0 (unknown: stat'ed by the decode task) otherwise."""
    try:
        v = int(n or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
    return v if v > 0 else 0


# -------------------------------------------------------------------------------- driver: listing

def list_located(uri: str, suffixes: tuple[str, ...]) -> list[tuple] | None:
    """Sources when ``uri`` is one shard, one HF Parquet file or a JSONL manifest; else None
    (a folder, glob, media file or URI manifest: the caller's listing applies)."""
    fs, path = storage.get_fs(uri)
    low = path.lower()
    if not low.endswith(SHARD_SUFFIXES + JSONL_SUFFIXES + (".parquet",)) or not fs.isfile(path):
        return None
    uri = storage.unstrip(fs, path)  # ids as a folder listing writes them (absolute locally)
    if low.endswith(JSONL_SUFFIXES):
        return read_jsonl(uri)
    info = fs.info(path)
    version, size = storage.version_of(info), int(info.get("size") or 0)
    if low.endswith(".parquet"):
        return None if parquet_is_hf(uri) is False else index_hf_parquet(uri, version, size)
    return index_shard(uri, version, size, suffixes)


def expand(files: list[tuple[str, str, int]], suffixes: tuple[str, ...]) -> list[tuple]:
    """A folder/prefix/glob listing ``(uri, version, size)`` with shards and HF Parquet files
    replaced by their sources (indexed ``INDEX_THREADS`` at a time); other Parquet files (URI
    manifests, other tables) are dropped, a Parquet file with an unreadable footer is one
    failure source, media files are kept as they are. Sorted by uri."""
    plain, jobs = [], []
    for u, v, n in files:
        low = u.lower()
        if low.endswith(SHARD_SUFFIXES):
            jobs.append(lambda u=u, v=v, n=n: index_shard(u, v, n, suffixes))
        elif low.endswith(".parquet"):
            # an unreadable footer is indexed anyway: its failure row, not silence
            jobs.append(lambda u=u, v=v, n=n: (index_hf_parquet(u, v, n)
                                               if parquet_is_hf(u) is not False
                                               else [(u, v, n)] if u.lower().endswith(suffixes)
                                               else []))
        else:
            plain.append((u, v, n))
    if not jobs:
        return plain
    with ThreadPoolExecutor(min(INDEX_THREADS, len(jobs))) as pool:
        for srcs in pool.map(lambda j: j(), jobs):
            plain.extend(srcs)
    return sorted(plain, key=lambda s: s[0])


def group_key(loc: dict | None) -> str | None:
    """Sources decoded together: every member of one .tar.gz shard (one stream), every row of
    one Parquet row group (one read). None: the source decodes alone."""
    if not loc or loc["kind"] not in ("tgz", "hf"):
        return None
    return f"{loc['container']}|{loc['offset'] if loc['kind'] == 'hf' else ''}"


def group_row(members: list[tuple]) -> tuple[str, str, dict]:
    """Decode-input row (source_uri, version, locator) for the sources of one group (in their
    container order: tar order for tgz, row order for hf)."""
    u0, v0, _, l0 = members[0]
    ms = [_member(u, index=(l["length"] if l["kind"] == "hf" else i), length=n,
                  meta=l["meta"], name=l["message"] if l["kind"] == "tgz" else "")
          for i, (u, _, n, l) in enumerate(members)]
    loc = _loc(l0["kind"], l0["container"], offset=l0["offset"], members=ms)
    return l0["container"], v0, loc if l0["kind"] == "hf" else dict(loc, offset=0)


LOCATOR_TYPE = pa.struct([
    ("kind", pa.string()), ("container", pa.string()), ("container_size", pa.int64()),
    ("offset", pa.int64()),
    ("length", pa.int64()), ("start_s", pa.float64()), ("end_s", pa.float64()),
    ("meta", pa.string()), ("error_type", pa.string()), ("message", pa.string()),
    ("members", pa.list_(pa.struct([("uri", pa.string()), ("name", pa.string()),
                                    ("index", pa.int64()), ("length", pa.int64()),
                                    ("meta", pa.string())]))),
])
