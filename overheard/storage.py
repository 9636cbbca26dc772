"""Object-storage helpers over fsspec: local paths, ``s3://`` (s3fs) and any fsspec URL.

Credentials come only from the standard mechanisms (AWS env vars / profiles / instance role
through s3fs, ``FSSPEC_*`` config); nothing here accepts or logs secrets. ``S3_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL``) selects an S3-compatible server. ``hf://org/name[@rev]/sub``
URIs are Hugging Face Hub models, resolved through the hub's own cache by ``overheard.hub`` in
``exists``/``localize``/``read_bytes``/``open_input`` (bare ``org/name`` ids become such URIs where a job takes a model:
``hub.model_ref``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import stat
import tempfile
import uuid
from typing import Iterator

import fsspec

from overheard import hub


def _storage_options(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict = {}
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-without-protocol) for a URI or local path. ``file:///abs`` is the
    local path ``/abs`` (it used to resolve to ``./file:/abs`` under the working directory)."""
    proto = protocol_of(uri)
    fs = fsspec.filesystem(proto, **_storage_options(proto))
    if proto == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return fs, os.path.abspath(local_path(path))
    return fs, fs._strip_protocol(uri)


def arrow_fs(uri: str):
    """(pyarrow filesystem, path) for ``uri`` (Ray Data writers, Ray Train storage); object stores
    go through fsspec so that S3_ENDPOINT_URL and the usual credentials apply exactly as here."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    fs, path = get_fs(uri)
    if protocol_of(uri) == "file":
        return LocalFileSystem(), path
    return PyFileSystem(FSSpecHandler(fs)), path


# ------------------------------------------------------------------ local file names and stat
# A file name that is not valid UTF-8 (a Latin-1 "caf\xe9.wav" from an old archive) cannot be
# a Parquet string. Such a name is carried as text with each undecodable byte written
# ``\xNN`` (Python's backslashreplace), and mapped back to the bytes when opened. A literal
# name that already reads like that wins (checked first), so no existing file is shadowed.
_ESCAPED = re.compile(r"\\x([0-9a-fA-F]{2})")


def uri_text(path: str) -> str:
    """A local path (possibly holding surrogate-escaped bytes from os.listdir) as valid UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def local_path(text: str) -> str:
    """Inverse of :func:`uri_text`: the OS path a local source URI names."""
    if "\\x" not in text or os.path.lexists(text):
        return text
    # bytes >= 0x80 that did not decode are what os.fsdecode turns into lone surrogates
    raw = _ESCAPED.sub(lambda m: chr(0xDC00 + int(m.group(1), 16))
                       if int(m.group(1), 16) >= 0x80 else m.group(0), text)
    return raw if os.path.lexists(raw) else text


class NotARegularFile(OSError):
    """A FIFO, socket, device or directory where a media file was expected."""


def local_stat(uri: str) -> os.stat_result:
    """stat() of a local source, following links (the version is the target's, what is read)."""
    return os.stat(get_fs(uri)[1])


def stat_version(st: os.stat_result) -> str:
    """``mtime:size`` as fsspec's local info gives it (same text as older outputs)."""
    return f"{st.st_mtime}:{st.st_size}"


def special_file(st: os.stat_result) -> str:
    """"" for a regular file, else what it is (fifo, socket, char device, block device,
    directory). Decided from stat alone: opening a FIFO blocks until a writer appears."""
    m = st.st_mode
    if stat.S_ISREG(m):
        return ""
    for test, what in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "directory")):
        if test(m):
            return what
    return "special file"


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Full URI for a path of ``fs`` (keeps local paths plain)."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"


def join(base: str, *parts: str) -> str:
    if protocol_of(base) == "file":
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def open_input(uri: str, block_size: int = 8 << 20):
    """A seekable binary file object. Remote objects are read with range requests in
    ``block_size`` blocks (8 MiB: one request per ~10 min of 128 kbit/s AAC), never whole."""
    if uri.startswith("hf://"):
        uri = hub.resolve(uri)
    fs, path = get_fs(uri)
    if protocol_of(uri) == "file":
        # O_NONBLOCK: a FIFO that slipped past the stat check (swapped in after it) must not
        # block here; on a regular file the flag has no effect on reads.
        f = open(path, "rb", opener=lambda p, fl: os.open(p, fl | getattr(os, "O_NONBLOCK", 0)))
        what = special_file(os.fstat(f.fileno()))
        if what:
            f.close()
            raise NotARegularFile(f"{path}: not a regular file ({what})")
        return f
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


_UMASK = _umask()  # read once at import (os.umask can only be read by setting it)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write so that a reader never sees a partial object: temp file + rename locally;
    on object stores a single PUT is already atomic (the object appears whole or not at all)."""
    fs, path = get_fs(uri)
    if protocol_of(uri) == "file":
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".part")
        try:
            # mkstemp makes 0600 files; outputs are meant to be shared like any file the user
            # writes: the usual 0666 less the process umask (0644 under umask 022)
            os.fchmod(fd, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(uri: str) -> bytes:
    if uri.startswith("hf://"):
        uri = hub.resolve(uri)
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(uri: str) -> bool:
    if uri.startswith("hf://"):  # a cold cache offline raises hub.HubNotCached: one line, before any work
        return os.path.exists(hub.resolve(uri))
    fs, path = get_fs(uri)
    return fs.exists(path)


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> Iterator[tuple[str, int, str]]:
    """Yield (uri, size, version) for every file under a prefix/dir, or matching a glob, in
    ascending URI order (:func:`iter_file_pages`, flattened).

    ``version`` is the object's ETag on object stores and ``mtime:size`` locally; the caption
    table records it so a user can tell which object version a caption describes.
    """
    for page in iter_file_pages(uri, suffixes):
        yield from page


# Objects per listing page. 1000 is S3's own maximum per ListObjectsV2 call; tests set it tiny
# to exercise paging on the loopback server.
LIST_PAGE_SIZE = 1000


def iter_file_pages(uri: str, suffixes: tuple[str, ...] = (),
                    page_size: int | None = None) -> Iterator[list[tuple[str, int, str]]]:
    """Pages of (uri, size, version) for every file under a prefix/dir, or matching a glob,
    hidden names (``.x``) and directories left out. Pages come in ascending URI order, so every
    URI of a later page sorts after every URI of an earlier one (``--limit`` stops there).

    Held in memory: one page. ``s3://`` is listed with ListObjectsV2 page by page (``page_size``
    keys per request); local folders are walked one directory at a time in sorted order; other
    fsspec stores are listed with ``find`` (one page)."""
    page_size = page_size or LIST_PAGE_SIZE
    fs, path = get_fs(uri)
    local = protocol_of(uri) == "file"
    # a folder or file literally named "take [1]" or "what?" is that path, not a pattern
    if any(ch in path for ch in "*?[") and not fs.exists(path):
        infos = _glob_infos(fs, path, page_size)
    elif fs.isfile(path):
        infos = iter([(path, fs.info(path))])
    else:
        infos = _find_infos(fs, path, page_size)
    page: list[tuple[str, int, str]] = []
    for p, info in infos:
        name = posixpath.basename(p)
        if info.get("type") == "directory" or name.startswith("."):
            continue
        if suffixes and not name.lower().endswith(suffixes):
            continue
        page.append(_local_entry(p, info) if local else
                    (unstrip(fs, p), int(info.get("size") or 0), version_of(info)))
        if len(page) >= page_size:
            yield page
            page = []
    if page:
        yield page


def _local_entry(p: str, info: dict) -> tuple[str, int, str]:
    # the listing's links report the link's own mtime; the post-decode check stats the target
    # (what was read), so both use the target's stat. A special file (FIFO, socket, device) is
    # listed with size 0 and fails as not_a_file.
    try:
        st = os.stat(p)
    except OSError:  # broken link / loop: listed, fails as not_found / read_error when opened
        return uri_text(p), 0, version_of(info)
    return uri_text(p), (st.st_size if not special_file(st) else 0), stat_version(st)


def _is_s3(fs) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in proto and hasattr(fs, "call_s3")


def _find_infos(fs, path: str, page_size: int, maxdepth: int | None = None):
    """(path, info) of everything under ``path`` in ascending path order, streamed."""
    if _is_s3(fs):
        yield from _s3_pages(fs, path, page_size, maxdepth == 1)
    elif unstrip(fs, "/") == "/":  # the local file system
        yield from _walk_sorted(fs, path, maxdepth)
    else:  # other stores: fsspec's find holds the whole listing (one page)
        yield from sorted(fs.find(path, maxdepth=maxdepth, detail=True,
                                  withdirs=False).items())


def _s3_pages(fs, path: str, page_size: int, one_level: bool = False):
    """ListObjectsV2, ``page_size`` keys a request, continuation token to the next page: never
    more than one page of the prefix in memory (s3fs's find collects every key first). S3
    returns keys in ascending UTF-8 byte order."""
    bucket, key, _ = fs.split_path(path)
    prefix = key.rstrip("/") + "/" if key else ""
    kw = dict(Bucket=bucket, Prefix=prefix, MaxKeys=page_size)
    if one_level:
        kw["Delimiter"] = "/"
    while True:
        r = fs.call_s3("list_objects_v2", **kw)
        for c in r.get("Contents", []):
            if c["Key"].endswith("/"):
                continue  # a folder marker
            yield f"{bucket}/{c['Key']}", dict(c, size=c.get("Size"), type="file")
        if not r.get("IsTruncated"):
            return
        kw["ContinuationToken"] = r["NextContinuationToken"]


def _walk_sorted(fs, path: str, maxdepth: int | None = None):
    """Files under a local folder in ascending full-path order: a directory's entries sorted
    with sub-folders keyed ``name/`` (so ``d.wav`` < ``d/x`` < ``d0.wav``, as the full paths
    sort), one directory listed at a time (fsspec's ``ls``: links to folders are followed, as
    ``find`` does)."""
    try:
        infos = fs.ls(path, detail=True)
    except (FileNotFoundError, OSError):
        return
    keyed = []
    for info in infos:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        is_dir = info.get("type") == "directory"
        keyed.append((name + "/" if is_dir else name, is_dir, info))
    for _, is_dir, info in sorted(keyed, key=lambda k: k[0]):
        if not is_dir:
            yield info["name"], info
        elif maxdepth is None or maxdepth > 1:
            yield from _walk_sorted(fs, info["name"], None if maxdepth is None else maxdepth - 1)


def _glob_infos(fs, path: str, page_size: int):
    """fsspec's glob (root before the first wildcard, depth from the pattern, regex from
    ``glob_translate``) over the streamed listing instead of one dict of every match."""
    from fsspec.utils import glob_translate

    idx = min(i for i in (path.find("*"), path.find("?"), path.find("["), len(path)) if i >= 0)
    if "/" in path[:idx]:
        cut = path[:idx].rindex("/")
        root, depth = path[:cut + 1], path[cut + 1:].count("/") + 1
    else:
        root, depth = "", path[idx + 1:].count("/") + 1
    if "**" in path:
        depth = None
    pattern = re.compile(glob_translate(path))
    for p, info in _find_infos(fs, root.rstrip("/") or root, page_size, depth):
        if pattern.match(p):
            yield p, info


def version_of(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"{mtime}:{info.get('size')}"


def localize(uri: str, cache_dir: str | None = None) -> str:
    """Local path for a file or directory URI; remote ones are copied once into a cache.

    The cache key hashes the URI and the remote listing (names, sizes, versions), so a model
    replaced in place is fetched again, and concurrent actors on one node share one copy
    (copied into a unique temp dir, then renamed into place).
    """
    if uri.startswith("hf://"):
        return hub.resolve(uri)
    if protocol_of(uri) == "file":
        return os.path.abspath(uri)
    fs, path = get_fs(uri)
    cache_dir = cache_dir or os.environ.get(
        "OVERHEARD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "overheard")
    )
    if fs.isfile(path):
        listing = [(posixpath.basename(path), fs.info(path))]
        is_dir = False
    else:
        listing = sorted(
            (posixpath.relpath(p, path), i) for p, i in fs.find(path, detail=True).items()
        )
        is_dir = True
    h = hashlib.sha256(uri.encode())
    for rel, info in listing:
        h.update(f"{rel}|{info.get('size')}|{version_of(info)}".encode())
    dest = os.path.join(cache_dir, h.hexdigest()[:24])
    target = os.path.join(dest, "model") if is_dir else os.path.join(dest, listing[0][0])
    if os.path.exists(target):
        return target
    os.makedirs(dest, exist_ok=True)
    tmp = os.path.join(dest, f".tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    try:
        for rel, _ in listing:
            src = posixpath.join(path, rel) if is_dir else path
            out = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            fs.get_file(src, out)
        if is_dir:
            try:
                os.rename(tmp, target)
            except OSError:  # another actor won the race; its copy is identical
                pass
        else:
            os.replace(os.path.join(tmp, listing[0][0]), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


__all__ = [
    "get_fs", "open_input", "write_bytes_atomic", "read_bytes", "exists", "list_files",
    "iter_file_pages",
    "localize", "join", "protocol_of", "short_hash",
]
