"""What the caption job has to do: INPUT listed in chunks, deduplicated, minus what OUTPUT already
holds, as Arrow (no Ray import).

    listing = open_listing(cfg.input, cfg.all_files)   # checks the input now; lists nothing yet
    plan = plan_sources(listing, cfg.output, todo_dir, limit=cfg.limit)
    plan.count, plan.tables(), plan.path                 # the todo list, spilled to Parquet

Every table here has SOURCE_SCHEMA's columns: ``source_uri`` (string), ``source_version``
(string), ``size`` (int64 bytes, 0 = unknown) and ``locator`` (overheard.layouts.LOCATOR_TYPE:
how a decode task reaches a tar member / HF Parquet row / JSONL span; null for loose files).

Inputs (``open_listing``): a folder/prefix or a glob (media files, plus WebDataset shards and
HF Parquet files expanded into their members), one file, a manifest table (``.parquet``/``.csv``
with a ``uri`` column), a JSONL manifest (NeMo), one shard or HF Parquet file, or a FOLDER of
manifest parts (a folder/prefix/glob whose files are all ``.parquet`` URI tables, ``.csv`` or
``.jsonl``/``.ndjson``: every part is read in turn).

What the driver holds (the point of this module: a 10M-entry archive is never a list of Python
objects):

* listing: one page (1,000 objects; S3 ListObjectsV2 page by page, local folders one directory
  at a time) or one manifest batch (CHUNK_ROWS rows) or one container's members at a time;
* done: the URIs already in OUTPUT, one Arrow array (``jobs.sink.done_uris``); each chunk is
  anti-joined against it (``pc.is_in``, which hashes the done array once per call, so chunks
  are first merged to at least as many rows as there are done URIs: the cost stays linear);
* the sources still to do: in memory up to SPILL_ROWS rows (sorted by URI and deduplicated
  there), beyond that hash-partitioned into BUCKETS Parquet files in a local temp folder and
  deduplicated bucket by bucket (memory ~ todo / BUCKETS rows; todo order: bucket, then URI);
* ``--limit N``: only the first N todo sources by URI (a running top-N, exact whatever the
  input's order); when the listing comes in URI order (folders and prefixes do), listing stops
  at the first page that sorts after the N-th source.

A URI listed twice is one source, the first entry winning (its version and size); the repeats
are counted (``Plan.duplicate``), never as sources. The todo list is written to ``todo_dir`` as
Parquet parts of about TODO_PART_ROWS rows (a part ends between two archive containers;
``plan.tables()`` streams it); with ``packing``, each part is packed into decode blocks as it is
written (``jobs.blocks.pack_table``: rows ordered by block, a ``block`` column, numbers running
on across parts), which the caption job's read tasks take as they are (jobs/todo_source.py).
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from overheard import layouts, storage
from overheard.media import MEDIA_SUFFIXES  # one list, in the model package
MANIFEST_SUFFIXES = (".parquet", ".csv")
# files a folder of manifest parts may hold (.json is left out: a folder of JSON side files is
# not a manifest)
PART_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
URI_COLUMNS = ("uri", "source_uri", "path", "url", "file")

SOURCE_SCHEMA = pa.schema([("source_uri", pa.string()), ("source_version", pa.string()),
                           ("size", pa.int64()), ("locator", layouts.LOCATOR_TYPE)])
_SEQ = "__seq"  # listing order of an entry: the first entry of a URI wins

# Manifest rows read per batch: 64k rows of ~100-byte URIs is ~10 MB of Arrow.
CHUNK_ROWS = 65_536
# Todo sources kept in memory before spilling: 500k rows ~ 70 MB (URI ~70 B, ETag ~34 B, size,
# order); measured in bench/scale.py (c)/(d).
SPILL_ROWS = 500_000
# Hash buckets of a spilled listing: 10M todo sources -> ~160k rows (~25 MB) per bucket.
BUCKETS = 64
# Rows per todo Parquet part (a few MB each), packed into decode blocks one part at a time.
TODO_PART_ROWS = 100_000


# ------------------------------------------------------------------------------------- listing

@dataclass
class Listing:
    """A checked input, listed lazily by :meth:`chunks`. ``ordered``: chunks come in ascending
    URI order and each carries a bound every later entry sorts after (folders, prefixes, globs),
    so ``--limit`` can stop listing early."""

    input: str
    kind: str  # files | manifest | parts | jsonl | container
    all_files: bool = False
    page_size: int | None = None
    ordered: bool = False
    output: str = ""  # OUTPUT, when inside INPUT: its own Parquet files are never manifest parts

    def chunks(self) -> Iterator[tuple[pa.Table, str | None]]:
        """(table, bound): the table's columns as SOURCE_SCHEMA (``locator`` only where a layout
        put one), in listing order, not deduplicated across chunks; ``bound`` (ordered listings
        only): every entry of a later chunk sorts after it."""
        if self.kind == "files":
            yield from _file_chunks(self.input, self.all_files, self.page_size)
        elif self.kind == "parts":
            for page in storage.iter_file_pages(self.input, PART_SUFFIXES, self.page_size):
                for uri, _, _ in page:
                    if not (self.output and inside(uri, self.output)):
                        yield from ((t, None) for t in _manifest_chunks(uri))
        elif self.kind == "manifest" or self.kind == "jsonl":
            yield from ((t, None) for t in _manifest_chunks(self.input))
        else:  # one shard / HF Parquet file: its members (bounded by the container)
            srcs = layouts.list_located(self.input, MEDIA_SUFFIXES)
            for lo in range(0, len(srcs), CHUNK_ROWS):
                yield _tuples_table(srcs[lo:lo + CHUNK_ROWS]), None


def open_listing(uri: str, all_files: bool = False, page_size: int | None = None,
                 output: str = "") -> Listing:
    """Check INPUT before any work (exists, readable, a manifest's URI column is text) and say
    how it is listed; raises FileNotFoundError / PermissionError / ValueError with one line.
    ``output``: the job's OUTPUT (its files are never sources nor manifest parts)."""
    fs, path = storage.get_fs(uri)
    low = path.lower()
    if low.endswith(layouts.JSONL_SUFFIXES) and fs.isfile(path):
        return Listing(storage.unstrip(fs, path), "jsonl")
    if low.endswith(layouts.SHARD_SUFFIXES) and fs.isfile(path):
        return Listing(uri, "container")
    if low.endswith(MANIFEST_SUFFIXES) and fs.isfile(path):
        full = storage.unstrip(fs, path)
        if low.endswith(".parquet") and layouts.parquet_is_hf(full) is not False:
            return Listing(uri, "container")  # HF audio Parquet (or an unreadable footer: its row)
        _manifest_column(uri)
        return Listing(uri, "manifest")
    if not fs.exists(path) and not any(ch in path for ch in "*?["):
        raise FileNotFoundError(f"input not found: {uri}")
    if not all_files and _is_parts_folder(uri, page_size, output):
        first = next(u for p in storage.iter_file_pages(uri, PART_SUFFIXES, page_size)
                     for u, _, _ in p if not (output and inside(u, output)))
        if first.lower().endswith(MANIFEST_SUFFIXES):
            _manifest_column(first)
        return Listing(uri, "parts", page_size=page_size, output=output)
    return Listing(uri, "files", all_files, page_size, ordered=True, output=output)


def _is_parts_folder(uri: str, page_size: int | None, output: str = "") -> bool:
    """A folder/prefix/glob holding manifest parts and no media, shard or HF Parquet file.
    Stops at the first media file (a media folder costs one page here)."""
    found = False
    suffixes = MEDIA_SUFFIXES + layouts.SHARD_SUFFIXES + PART_SUFFIXES
    for page in storage.iter_file_pages(uri, suffixes, page_size):
        for u, _, _ in page:
            low = u.lower()
            if output and inside(u, output):
                continue
            if low.endswith(".parquet"):
                if layouts.parquet_is_hf(u) is not False:
                    return False
                found = True
            elif low.endswith(PART_SUFFIXES):
                found = True
            else:
                return False
    return found


def _file_chunks(uri: str, all_files: bool, page_size: int | None):
    """One table per listing page; shards and HF Parquet files of the page replaced by their
    members (overheard.layouts.expand). Bound: the next page's first listed URI (a container's
    members sort after the container's own URI), None for the last page; so one page is
    listed ahead."""
    suffixes = () if all_files else MEDIA_SUFFIXES
    pages = storage.iter_file_pages(uri, suffixes and suffixes + layouts.CONTAINER_SUFFIXES,
                                    page_size)
    page = next(pages, None)
    while page is not None:
        nxt = next(pages, None)
        srcs = layouts.expand([(u, v, n) for u, n, v in page], suffixes or MEDIA_SUFFIXES)
        if srcs:
            yield _tuples_table(srcs), (nxt[0][0] if nxt else None)
        page = nxt


def _tuples_table(srcs: list[tuple]) -> pa.Table:
    """(uri, version, size[, locator]) tuples (one page / container) -> a table."""
    cols = {"source_uri": pa.array([s[0] for s in srcs], pa.string()),
            "source_version": pa.array([s[1] for s in srcs], pa.string()),
            "size": pa.array([int(s[2] or 0) for s in srcs], pa.int64())}
    if any(len(s) > 3 and s[3] for s in srcs):
        cols["locator"] = pa.array([s[3] if len(s) > 3 else None for s in srcs],
                                   layouts.LOCATOR_TYPE)
    return pa.table(cols)


def _manifest_column(uri: str) -> str:
    """The URI column of a manifest table (from its footer / first CSV block), checked."""
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        if path.lower().endswith(".parquet"):
            schema = pq.ParquetFile(f).schema_arrow
        else:
            schema = pcsv.open_csv(f).schema
    col = next((c for c in URI_COLUMNS if c in schema.names), None)
    if col is None:
        raise ValueError(f"manifest {uri} needs one of the columns {URI_COLUMNS}")
    t = schema.field(col).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise ValueError(f"manifest {uri}: column {col!r} must hold text (URIs), got {t}")
    return col


def _manifest_chunks(uri: str) -> Iterator[pa.Table]:
    """A manifest file in batches of CHUNK_ROWS rows: Parquet row batches, CSV blocks, JSONL
    lines (overheard.layouts.iter_jsonl: spans, failure rows for bad lines)."""
    low = uri.lower()
    if low.endswith(layouts.JSONL_SUFFIXES):
        for srcs in layouts.iter_jsonl(uri, CHUNK_ROWS):
            yield _tuples_table(srcs)
        return
    col = _manifest_column(uri)
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        if low.endswith(".parquet"):
            # page by page through a 1 MiB buffer, one column at a time: a manifest written as
            # one 1M-row row group then costs ~80 MiB to read instead of ~110 (measured)
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            cols = [c for c in (col, "version", "size") if c in pf.schema_arrow.names]
            batches = pf.iter_batches(batch_size=CHUNK_ROWS, columns=cols, use_threads=False)
        else:
            names = pcsv.open_csv(f).schema.names
            f.seek(0)
            # text throughout: a column's type is inferred from the first block only, and a
            # later block that disagrees would stop the listing half-way
            types = {c: pa.string() for c in (col, "version", "size") if c in names}
            batches = pcsv.open_csv(f, read_options=pcsv.ReadOptions(block_size=8 << 20),
                                    convert_options=pcsv.ConvertOptions(
                                        column_types=types, include_columns=list(types)))
        for b in batches:
            yield _manifest_table(b, col)


def _manifest_table(b: pa.RecordBatch, col: str) -> pa.Table:
    """A manifest batch -> SOURCE_SCHEMA columns: rows without a URI dropped; any type of
    version kept as its text; a size that is not a positive integer is 0 (unknown)."""
    n = b.num_rows
    uri = pc.cast(b.column(col), pa.string())
    names = b.schema.names
    if "version" not in names:
        ver = pa.array([""] * n, pa.string())
    elif pa.types.is_string(b.schema.field("version").type):
        ver = pc.fill_null(b.column("version"), "")
    else:  # an int VersionId, a timestamp: the text Python gives it (as before)
        ver = pa.array(["" if v is None else str(v) for v in b.column("version").to_pylist()],
                       pa.string())
    if "size" not in names:
        size = pa.array(np.zeros(n, np.int64))
    elif pa.types.is_integer(b.schema.field("size").type):
        s = pc.fill_null(pc.cast(b.column("size"), pa.int64()), 0)
        size = pc.max_element_wise(s, 0)
    else:
        size = pa.array([_size(v) for v in b.column("size").to_pylist()], pa.int64())
    t = pa.table({"source_uri": uri, "source_version": ver, "size": size})
    keep = pc.and_(pc.is_valid(uri), pc.not_equal(pc.fill_null(uri, ""), ""))
    return t.filter(keep)


def _size(n) -> int:
    """A manifest's size cell as bytes; 0 (unknown) for anything that is not a size."""
    try:
        v = int(n)
    except (TypeError, ValueError, OverflowError):
        return 0
    return v if v > 0 else 0


# ------------------------------------------------------------------------------------ planning

def inside(uri: str, output: str) -> bool:
    """True when source ``uri`` lies under ``output`` (output placed inside the input: its
    own parts, manifests and temp files must never become sources)."""
    if storage.protocol_of(uri) != storage.protocol_of(output):
        return False
    u, o = storage.get_fs(uri)[1], storage.get_fs(output)[1].rstrip("/")
    return u == o or u.startswith(o + "/")


def _outside(t: pa.Table, output: str) -> pa.Table:
    """Rows of ``t`` not under ``output``. Only URIs containing the output folder's name are
    checked one by one (:func:`inside`); that is none of them unless OUTPUT is inside INPUT."""
    if not output or t.num_rows == 0:
        return t
    name = posixpath.basename(storage.get_fs(output)[1].rstrip("/"))
    cand = pc.match_substring(t.column("source_uri"), name) if name else None
    idx = (np.arange(t.num_rows) if cand is None
           else np.flatnonzero(cand.to_numpy(zero_copy_only=False)))
    if len(idx) == 0:
        return t
    keep = np.ones(t.num_rows, bool)
    uris = t.column("source_uri").take(pa.array(idx)).to_pylist()
    keep[idx] = [not inside(u, output) for u in uris]
    return t if keep.all() else t.filter(pa.array(keep))


@dataclass
class _Counts:
    listed: int = 0        # listing entries (after leaving out OUTPUT's own files)
    skipped_done: int = 0  # distinct sources done in OUTPUT
    duplicate: int = 0     # entries repeating a URI listed before (done or todo)
    complete: bool = True  # False: --limit stopped the listing early


def _dedup_sorted(t: pa.Table, counts: _Counts | None = None) -> pa.Table:
    """Sorted by URI, one row per URI: the first listed (lowest ``__seq``) wins; the rows
    dropped are added to ``counts.duplicate``."""
    if t.num_rows == 0:
        return t
    t = t.take(pc.sort_indices(t, sort_keys=[("source_uri", "ascending"), (_SEQ, "ascending")]))
    u = t.column("source_uri").combine_chunks()
    if len(u) < 2:
        return t
    first = np.ones(len(u), bool)
    first[1:] = pc.not_equal(u[1:], u[:-1]).to_numpy(zero_copy_only=False)
    if counts is not None:
        counts.duplicate += len(first) - int(first.sum())
    return t if first.all() else t.filter(pa.array(first))


def _normal(t: pa.Table, locator: bool = False) -> pa.Table:
    """Columns in SOURCE_SCHEMA order (+ ``__seq``); ``locator`` added as nulls if asked."""
    names = [n for n in SOURCE_SCHEMA.names if n in t.column_names or (locator and n == "locator")]
    if locator and "locator" not in t.column_names:
        t = t.append_column("locator", pa.nulls(t.num_rows, layouts.LOCATOR_TYPE))
    return t.select(names + ([_SEQ] if _SEQ in t.column_names else []))


def _concat(tables: list[pa.Table]) -> pa.Table:
    loc = any("locator" in t.column_names for t in tables)
    return pa.concat_tables([_normal(t, loc) for t in tables])


# a URI that may not be in normal local form: file://, or an absolute path whose part before
# any '#' / '::' holds '//', '/./' or '/../' (or ends in '/.' / '/..')
_ODD_LOCAL = r"^(file://|/[^#]*?(//|/\.\.?(/|#|::|$)))"


def local_uri(uri: str) -> str:
    """A local source URI in its one normal form: ``file://`` stripped, then for an absolute
    path the part before any '#' (a media fragment ``#t=``, a tar / Parquet member) or '::'
    normalised (``os.path.normpath``: '..', '.', '//'), the suffix kept as it is. Relative paths,
    ``file://`` URIs that are not absolute and other protocols (s3://, ...) are left alone."""
    p = uri[7:] if uri.startswith("file://") else uri
    if not p.startswith("/"):
        return uri
    cut = min((i for i in (p.find("#"), p.find("::")) if i >= 0), default=len(p))
    head = os.path.normpath(p[:cut])
    if head.startswith("//"):  # normpath keeps a leading '//' (POSIX): one '/' names the same
        head = "/" + head.lstrip("/")
    return head + p[cut:]


def _local_uris(t: pa.Table) -> pa.Table:
    """``t`` with its local source URIs in normal form (:func:`local_uri`), so one file named
    as /x.wav, file:///x.wav and /a/../x.wav is one source (the dedup then counts the repeats).
    Only the URIs a regex flags go through Python; already normal ones (a folder listing's, an
    S3 prefix's) are untouched."""
    if t.num_rows == 0:
        return t
    col = t.column("source_uri").combine_chunks()
    mask = pc.fill_null(pc.match_substring_regex(col, _ODD_LOCAL), False)
    odd = col.filter(mask).to_pylist()
    if not odd:
        return t
    col = pc.replace_with_mask(col, mask, pa.array([local_uri(u) for u in odd], pa.string()))
    return t.set_column(t.column_names.index("source_uri"), "source_uri", col)


def _numbered(chunks, output: str, counts: _Counts):
    """The listing's chunks with local URIs in normal form (every listed URI passes here),
    OUTPUT's own files left out, each row numbered in listing order (``__seq``)."""
    seq = 0
    for t, bound in chunks:
        t = _outside(_local_uris(t), output)
        t = t.append_column(_SEQ, pa.array(np.arange(seq, seq + t.num_rows, dtype=np.int64)))
        seq += t.num_rows
        counts.listed += t.num_rows
        yield t, bound


def _merged(chunks, rows: int):
    """Chunks merged until each has at least ``rows`` rows (the bound of its last one)."""
    buf, n = [], 0
    for t, bound in chunks:
        buf.append(t)
        n += t.num_rows
        if n >= rows:
            yield _concat(buf), bound
            buf, n = [], 0
    if buf:
        yield _concat(buf), None


def _not_done(chunks, done: pa.Array, counts: _Counts):
    """The anti-join: rows whose URI is not in ``done`` (a source with captions or a permanent
    failure; see jobs.sink.done_uris). Done sources are counted once each: a mask over
    ``done`` (1 byte per done URI) marks those met, so a repeated entry counts as a duplicate."""
    met = np.zeros(len(done), bool)
    for t, bound in chunks:
        if len(done) and t.num_rows:
            at = pc.index_in(t.column("source_uri"), value_set=done)  # done is distinct
            hits = pc.drop_null(at).to_numpy()
            met[hits] = True
            # count_nonzero, not np.unique: 0.66 CPU-s per 1M hits for the sort (load ~40),
            # ~1 ms for the mask; chunks are >= len(done) rows, so this stays linear
            seen = int(np.count_nonzero(met))
            counts.duplicate += len(hits) - (seen - counts.skipped_done)
            counts.skipped_done = seen
            t = t.filter(pc.is_null(at))
        yield t, bound


def _first_n(chunks, n: int, ordered: bool, counts: _Counts) -> pa.Table | None:
    """The first ``n`` sources by URI (deduplicated, first entry wins), holding at most ``n``
    plus one chunk; stops reading ``chunks`` once an ordered listing has passed the n-th."""
    top = None
    for t, bound in chunks:
        if top is not None and top.num_rows >= n:
            # a URI equal to the n-th one may be a later duplicate: kept for the dedup to drop
            t = t.filter(pc.less_equal(t.column("source_uri"), top.column("source_uri")[n - 1]))
        if t.num_rows:
            top = _dedup_sorted(t if top is None else _concat([top, t]), counts).slice(0, n)
        if (ordered and bound is not None and top is not None and top.num_rows >= n
                and top.column("source_uri")[n - 1].as_py() < bound):
            counts.complete = False
            return top
    return top


def _bucket_ids(uris: pa.Array, buckets: int) -> np.ndarray:
    """A hash of each URI's bytes (numpy over the Arrow buffers: no Python object per row),
    modulo ``buckets``: the same URI always lands in the same bucket."""
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    uris = pc.cast(uris, pa.large_string())
    offs = np.frombuffer(uris.buffers()[1], np.int64, len(uris) + 1, uris.offset * 8)
    lo = offs[0]
    data = np.frombuffer(uris.buffers()[2], np.uint8)[lo:offs[-1]] if offs[-1] > lo else \
        np.zeros(0, np.uint8)
    lens = np.diff(offs)
    starts = offs[:-1] - lo
    pos = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lens)
    weights = np.random.default_rng(19).integers(1, 2**61, 64, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        prod = (data.astype(np.uint64) + np.uint64(1)) * weights[pos % 64]
        h = np.zeros(len(uris), np.uint64)
        nz = lens > 0
        if nz.any():
            h[nz] = np.add.reduceat(prod, starts[nz])
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return (h % np.uint64(buckets)).astype(np.int64)


class _Spill:
    """Todo rows hash-partitioned by URI into BUCKETS Parquet files in a local temp folder, so
    each URI's entries meet in one bucket and a bucket is deduplicated on its own."""

    def __init__(self, buckets: int | None = None):
        self.dir = tempfile.mkdtemp(prefix="overheard-plan-")
        self.buckets = buckets or BUCKETS
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.schema = SOURCE_SCHEMA.append(pa.field(_SEQ, pa.int64()))

    def add(self, t: pa.Table) -> None:
        if t.num_rows == 0:
            return
        t = _normal(t, locator=True).cast(self.schema)
        # hashed on the URI up to '#': a tar / Parquet file's members ("<container>#<member>")
        # land in one bucket, so the todo list keeps an archive group together (jobs/blocks.py)
        b = _bucket_ids(pc.replace_substring_regex(t.column("source_uri"), "#.*", ""),
                        self.buckets)
        order = np.argsort(b, kind="stable")
        t = t.take(pa.array(order))
        counts = np.bincount(b, minlength=self.buckets)
        lo = 0
        for i, c in enumerate(counts):
            if c:
                if i not in self.writers:
                    self.writers[i] = pq.ParquetWriter(os.path.join(self.dir, f"{i:03d}.parquet"),
                                                       self.schema)
                self.writers[i].write_table(t.slice(lo, int(c)))
            lo += int(c)

    def tables(self, counts: _Counts | None = None) -> Iterator[pa.Table]:
        """Each bucket deduplicated and sorted by URI, bucket by bucket."""
        for w in self.writers.values():
            w.close()
        for i in sorted(self.writers):
            yield _dedup_sorted(pq.read_table(os.path.join(self.dir, f"{i:03d}.parquet")), counts)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Plan:
    """The sources a run will caption, spilled to Parquet parts under ``path`` (SOURCE_SCHEMA,
    in todo order; packed: + ``block``, in block order). ``listed``/``skipped_done`` count
    distinct sources; ``duplicate`` the entries that repeat a URI listed before (a manifest
    naming a URI 3 times: 1 listed, 2 duplicate). With --limit, only duplicates of done sources
    and of the N kept are found (the rest are never deduplicated: that is what bounds its
    memory), so ``listed`` may count a duplicate beyond the N-th as a source. ``complete`` is
    False when --limit stopped the listing early."""

    count: int
    listed: int
    skipped_done: int
    complete: bool
    path: str
    parts: list[str] = field(default_factory=list)
    duplicate: int = 0

    def tables(self, batch_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
        """The todo list, ``batch_rows`` rows at a time, in order."""
        for p in self.parts:
            fs, path = storage.get_fs(p)
            with fs.open(path, "rb") as f:
                for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                    yield pa.Table.from_batches([b])

    def rows(self) -> list[tuple]:
        """The todo list as (uri, version, size[, locator]) tuples, for tests and benches (one
        Python tuple per source: small lists only; the caption job hands ``parts`` to Ray)."""
        out = []
        for t in self.tables():
            for u, v, n, loc in zip(*(t.column(c).to_pylist() for c in SOURCE_SCHEMA.names)):
                out.append((u, v, n, loc) if loc else (u, v, n))
        return out

    def remove(self) -> None:
        """Delete the spilled todo list (the run is over)."""
        if self.parts:
            fs, path = storage.get_fs(self.path)
            fs.rm(path, recursive=True)
            self.parts = []


class _TodoWriter:
    """Writes the todo list as Parquet parts of about TODO_PART_ROWS rows (a part ends between
    two archive containers, never inside one), each packed into decode blocks as it is written
    when ``packing`` is given (``jobs.blocks.pack_table``'s options; block numbers continue from
    part to part), so the driver holds one part at a time and never the run's blocks."""

    def __init__(self, path: str, packing: dict | None = None):
        self.path, self.parts, self.buf, self.rows, self.count = path, [], [], 0, 0
        self.packing, self.blocks = packing, 0

    def add(self, t: pa.Table) -> None:
        self.buf.append(t)
        self.rows += t.num_rows
        while self.rows >= TODO_PART_ROWS:
            t = _concat(self.buf)
            cut = _container_end(t, TODO_PART_ROWS)
            if cut == t.num_rows:
                self.buf = [t]
                break  # the container may go on in the next table: wait for its end
            self._write(t.slice(0, cut))
            rest = t.slice(cut)
            self.buf, self.rows = [rest], rest.num_rows

    def close(self) -> None:
        if self.rows:
            self._write(_concat(self.buf))
        self.buf, self.rows = [], 0

    def _write(self, t: pa.Table) -> None:
        t = _normal(t, locator=True).select(SOURCE_SCHEMA.names).cast(SOURCE_SCHEMA)
        if self.packing is not None:
            from jobs.blocks import pack_table

            t = pack_table(t, first=self.blocks, **self.packing)
            if t.num_rows:
                self.blocks = t.column("block")[-1].as_py() + 1
        buf = io.BytesIO()
        pq.write_table(t, buf, compression="zstd")
        uri = storage.join(self.path, f"part-{len(self.parts):05d}.parquet")
        storage.write_bytes_atomic(uri, buf.getvalue())
        self.parts.append(uri)
        self.count += t.num_rows


def _container_end(t: pa.Table, n: int) -> int:
    """The first row at or after ``n`` that does not continue row n-1's archive container (a
    .tar.gz shard or Parquet file whose members are grouped, overheard.layouts.group_key): the
    todo list is in URI order within a hash bucket and members are "<container>#...", so a
    container's members are consecutive. len(t) when the container runs to the end."""
    if n >= t.num_rows or "locator" not in t.column_names:
        return min(n, t.num_rows)
    from jobs.blocks import group_containers

    con = group_containers(t.column("locator").slice(n - 1))
    if not con[0].is_valid:
        return n
    same = pc.fill_null(pc.equal(con, con[0]), False).to_numpy(zero_copy_only=False)
    ends = np.flatnonzero(~same)
    return n - 1 + int(ends[0]) if len(ends) else t.num_rows


def plan_sources(listing: Listing, output: str, todo_dir: str, limit: int = 0,
                 done: pa.Array | None = None, packing: dict | None = None) -> Plan:
    """List ``listing``, leave out OUTPUT's own files and the sources ``done`` holds (default:
    ``jobs.sink.done_uris(output)``), deduplicate, keep the first ``limit`` by URI (0: all) and
    write the todo list to ``todo_dir``. Order: by URI (beyond SPILL_ROWS todo sources without
    --limit: by hash bucket, then URI). ``packing`` (``jobs.blocks.pack_table``'s keyword
    arguments, e.g. ``{}``): each part is written packed, ordered by decode block with a
    ``block`` column (the caption job's decode input, jobs/pipeline.py); None: unpacked."""
    if done is None:
        from jobs.sink import done_uris
        done = done_uris(output)
    counts = _Counts()
    chunks = _numbered(listing.chunks(), output, counts)
    # is_in hashes `done` once per call: calls on chunks at least that long keep it linear; with
    # --limit small chunks let an ordered listing stop soon after the n-th source
    chunks = _not_done(_merged(chunks, max(len(done), min(CHUNK_ROWS, limit) if limit
                                           else CHUNK_ROWS)), done, counts)
    writer = _TodoWriter(todo_dir, packing)
    if limit:
        top = _first_n(chunks, limit, listing.ordered, counts)
        if top is not None:
            writer.add(top)
    else:
        spill, held, n = None, [], 0
        try:
            for t, _ in chunks:
                if spill is not None:
                    spill.add(t)
                    continue
                held.append(t)
                n += t.num_rows
                if n > SPILL_ROWS:
                    spill = _Spill()
                    for h in held:
                        spill.add(h)
                    held = []
            for t in (spill.tables(counts) if spill is not None else
                      [_dedup_sorted(_concat(held), counts)] if held else []):
                writer.add(t)
        finally:
            if spill is not None:
                spill.remove()
    writer.close()
    return Plan(count=writer.count, listed=counts.listed - counts.duplicate,
                skipped_done=counts.skipped_done, complete=counts.complete, path=todo_dir,
                parts=writer.parts, duplicate=counts.duplicate)


def list_sources(uri: str, all_files: bool = False) -> pa.Table:
    """Every source of INPUT, deduplicated and sorted by URI, as one table (tests and small
    inputs; the caption job plans in chunks with :func:`plan_sources`)."""
    counts = _Counts()
    tables = [t for t, _ in _numbered(open_listing(uri, all_files).chunks(), "", counts)]
    if not tables:
        return SOURCE_SCHEMA.empty_table()
    t = _dedup_sorted(_concat(tables))
    return _normal(t, locator=True).select(SOURCE_SCHEMA.names).cast(SOURCE_SCHEMA)


__all__ = ["SOURCE_SCHEMA", "Listing", "Plan", "open_listing", "plan_sources", "list_sources",
           "inside", "MEDIA_SUFFIXES", "URI_COLUMNS"]
