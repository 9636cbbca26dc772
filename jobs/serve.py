"""``overheard serve OUTPUT``: browse and listen -- a local web page over captions, search and runs.

    overheard serve ./out                       # updates ./out/search-index first, then serves
    overheard serve ./out --index ./search-index --port 8080
    overheard serve s3://bucket/out --host 0.0.0.0 --token "$(openssl rand -hex 16)"

Pages (static files shipped in ``overheard/assets/web``, no CDN, no network at run time):

* ``/?q=TEXT``             search; results on load (a search link can be shared): file name,
                           start-end, caption, confidence, score, an audio player for that window
* ``/source?source_uri=U`` every window of one file as a timeline; click a window to hear it
* ``/runs?error_type=T``   every run's manifest (hours, windows/s, failures by type, a plot of
                           committed windows over time) and the failures table, filterable

API (JSON unless stated; what the pages use):

* ``GET /api/search?q=&k=``  -> ``[{source_uri, window_index, start_s, end_s, caption,
  confidence, score}]`` (``jobs.search.search``: CLAP-text vectors fused with BM25; ``k`` <= 100)
* ``GET /api/audio?source_uri=&start_s=&end_s=`` -> ``audio/wav`` (16-bit mono 48 kHz), decoded
  by the job's reader (``overheard.span.read_span``: channel mean, 48 kHz) from local or s3://;
  archive-layout ids (tar / .tar.gz members, HF Parquet rows, JSONL spans) are opened by
  ``overheard.layouts.open_by_id``, which reads only the container the id names
* ``GET /api/source?source_uri=`` -> ``{source_uri, name, windows: [...], failures: [...]}``
* ``GET /api/runs`` -> ``[manifest + {throughput: [[seconds, windows committed], ...]}]``
* ``GET /api/failures?error_type=&run_id=&limit=`` -> ``{counts: {type: n}, total, rows: [...]}``

Safe by default: binds 127.0.0.1; audio only for ``source_uri`` values present in the caption
tables (a snapshot read at start; anything else is 404, so no path or URL from a request is ever
opened); spans capped at ``--max-span-s``; with ``--token`` every request needs it (``?token=``
once, then an HttpOnly cookie; or ``Authorization: Bearer``); URI user-info and secret-looking
manifest keys are redacted from responses. Text from inputs is inserted into pages as text
(``textContent``), never as HTML.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import math
import os
import re
import sys
import wave
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.config_cli import parse
from overheard import layouts, storage
from overheard.media import TARGET_SR, MediaError
from overheard.span import read_span

# Columns the server keeps in memory from the caption parts (no embeddings: 130 B per window
# in Arrow on bench/serve.py's 100k rows).
LIGHT_COLUMNS = ["source_uri", "window_index", "start_s", "end_s", "caption", "model_id",
                 "run_id", "confidence"]
API_FIELDS = ["source_uri", "window_index", "start_s", "end_s", "caption", "confidence", "score"]
# route -> (the file holding its <main>, its name: title and body data-page); frame: page.html
PAGES = {"/": ("index.html", "search"), "/source": ("source.html", "source"),
         "/runs": ("runs.html", "runs")}
STATIC = {"app.js": "application/javascript", "style.css": "text/css"}
COOKIE = "overheard_token"
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|api_key|access_key", re.I)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


@dataclass
class ServeConfig:
    output: str = field(metadata={"help": "caption job output folder (local or s3://)"})
    index: str = field(default="", metadata={
        "help": "search index directory built by `overheard index` (default: build or update "
                "OUTPUT/search-index incrementally first; for an s3:// OUTPUT a local cache dir "
                "~/.cache/overheard/index/<hash>)"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it, use --token)"})
    port: int = field(default=8000, metadata={
        "min": 0, "max": 65535, "help": "TCP port (0: any free port, printed)"})
    token: str = field(default="", metadata={
        "help": "require this token on every request (?token=T once, then a cookie; or "
                "'Authorization: Bearer T'); default: none"})
    clap: str = field(default="", metadata={
        "help": "CLAP model dir for queries (default: the one the index recorded)"})
    max_span_s: float = field(default=60.0, metadata={
        "gt": 0.0, "help": "longest audio span /api/audio serves, seconds"})
    max_k: int = field(default=100, metadata={"min": 1, "help": "most results /api/search returns"})


# ------------------------------------------------------------------------------------ data access

def _parts(uri: str) -> list[str]:
    fs, path = storage.get_fs(uri)
    if not fs.exists(path):
        return []
    from jobs.sink import counts

    ok = counts(uri)  # committed parts only (jobs/sink.py)
    return sorted(storage.unstrip(fs, p) for p in fs.find(path) if ok(p))


def read_light(captions: str) -> pa.Table:
    """The caption parts' ``LIGHT_COLUMNS`` (``confidence`` null where a part lacks it)."""
    tables = []
    for u in _parts(captions):
        fs, path = storage.get_fs(u)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            have = [c for c in LIGHT_COLUMNS if c in pf.schema_arrow.names]
            t = pf.read(columns=have)
        n = t.num_rows
        cols = {}
        for c in LIGHT_COLUMNS:
            if c in t.column_names:
                cols[c] = t.column(c)
            else:
                cols[c] = pa.nulls(n, pa.float32() if c == "confidence" else pa.string())
        t = pa.table(cols)
        tables.append(t.set_column(t.schema.get_field_index("confidence"), "confidence",
                                   t.column("confidence").cast(pa.float32())))
    if not tables:
        return pa.table({c: pa.array([], pa.float32() if c == "confidence" else pa.string())
                         for c in LIGHT_COLUMNS})
    return pa.concat_tables(tables, promote_options="permissive").sort_by(
        [("source_uri", "ascending"), ("window_index", "ascending")])


def redact(obj):
    """Copy of a manifest without secrets: user-info in URIs masked, secret-looking keys dropped."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _USERINFO.sub("***@", obj)
    return obj


def _num(x):
    """JSON-safe float (NaN/inf -> None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class Archive:
    """What the server reads: the caption output (a snapshot of its window rows, for the source
    pages, confidences and the audio allow-list), its runs and failures (read per request), and
    the search index."""

    def __init__(self, output: str, index: str, clap: str = ""):
        from jobs.index import captions_dir

        self.captions, self.root = captions_dir(output)
        self.index, self.clap = index, clap or None
        self.rows = read_light(self.captions)
        self.uris = set(pc.unique(self.rows.column("source_uri")).to_pylist())
        self._conf = None
        self._runs_cache: dict = {}

    # -- search
    def confidence(self, uri: str, window_index: int, model_id: str):
        if self._conf is None:
            t = self.rows.filter(pc.is_valid(self.rows.column("confidence")))
            self._conf = {(u, int(w), m): c for u, w, m, c in zip(
                *(t.column(n).to_pylist() for n in ("source_uri", "window_index", "model_id",
                                                    "confidence")))}
        return self._conf.get((uri, int(window_index), model_id))

    def search(self, q: str, k: int) -> list[dict]:
        from jobs.search import search

        out = []
        for h in search(self.index, q, k, clap=self.clap):
            conf = h.get("confidence")  # the index's, when it carries the column
            if conf is None:
                conf = self.confidence(h["source_uri"], h["window_index"], h.get("model_id"))
            out.append(dict(source_uri=h["source_uri"], window_index=int(h["window_index"]),
                            start_s=_num(h["start_s"]), end_s=_num(h["end_s"]),
                            caption=h["caption"], confidence=_num(conf), score=_num(h["score"])))
        return out

    # -- sources
    def source(self, uri: str) -> dict | None:
        """A source's windows and failures; a source with failures only (a corrupt file) has
        no windows but is still shown. None when neither table names it."""
        if uri not in self.uris:
            fails = self.failures(source_uri=uri, limit=1000)["rows"] if uri else []
            if not fails:
                return None
            return dict(source_uri=uri, name=uri.rstrip("/").rsplit("/", 1)[-1], windows=[],
                        failures=fails)
        t = self.rows.filter(pc.equal(self.rows.column("source_uri"), uri))
        windows = [{f: (_num(r[f]) if f in ("start_s", "end_s", "confidence") else r[f])
                    for f in ("window_index", "start_s", "end_s", "caption", "confidence",
                              "run_id")} for r in t.to_pylist()]
        return dict(source_uri=uri, name=uri.rstrip("/").rsplit("/", 1)[-1], windows=windows,
                    failures=self.failures(source_uri=uri, limit=1000)["rows"])

    def audio_wav(self, uri: str, start_s: float, end_s: float) -> bytes:
        """The window ``[start_s, end_s)`` as 16-bit mono WAV at 48 kHz, read by
        ``overheard.span.read_span``: the job's reader and sample counting (exact in the first
        2 minutes of a file; later spans are found by seeking). Raises SpanError for times
        outside a JSONL span's ``t=a,b``: its windows are in file time and nothing outside the
        span was captioned, so nothing outside it is played (1 ms allowed for rounding)."""
        lo, hi = layouts.span_bounds(uri)
        if start_s < lo - 1e-3 or end_s > hi + 1e-3:
            raise SpanError(f"outside the source's span {lo:g}-{hi:g} s")
        f = layouts.open_by_id(uri)  # a shard member / Parquet row / span: its container only
        with f if f is not None else storage.open_input(uri) as f:
            x = read_span(f, start_s, end_s, TARGET_SR)
        pcm = (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(TARGET_SR)
            w.writeframes(pcm.tobytes())
        return buf.getvalue()

    # -- runs and failures
    def _throughput(self, m: dict) -> list[list[float]]:
        """[[seconds since start, windows committed]]: one point per caption part of the run,
        at the part's modification time, with its row count from the Parquet footer."""
        parts = m.get("parts")
        if not isinstance(parts, list):  # a count since issue 19: the files are in the commit log
            from jobs.sink import committed_files
            parts = [storage.join(self.root, f) for f in sorted(committed_files(
                self.root, m.get("run_id")))]
        parts = [p for p in parts if "/captions/" in p.replace(os.sep, "/")]
        pts = []
        for p in parts:
            try:
                fs, path = storage.get_fs(p)
                info = fs.info(path)
                t = info.get("mtime") or info.get("LastModified") or info.get("created")
                t = t.timestamp() if hasattr(t, "timestamp") else float(t)
                with fs.open(path, "rb") as f:
                    n = pq.ParquetFile(f).metadata.num_rows
            except (OSError, ValueError, TypeError):
                continue
            pts.append((t, n))
        start = float(m.get("started_at") or 0.0)
        series, total = [[0.0, 0]], 0
        for t, n in sorted(pts):
            total += n
            series.append([round(max(t - start, 0.0), 3), total])
        wall = m.get("wall_s")
        if wall is not None and series[-1][0] < wall:
            series.append([float(wall), series[-1][1]])
        return series

    def runs(self) -> list[dict]:
        out = []
        rdir = storage.join(self.root, "runs")
        fs, path = storage.get_fs(rdir)
        if not fs.exists(path):
            return out
        for d in sorted(fs.ls(path, detail=False)):
            rid = d.rstrip("/").rsplit("/", 1)[-1]
            muri = storage.join(rdir, rid, "manifest.json")
            try:
                m = json.loads(storage.read_bytes(muri))
            except (OSError, ValueError):
                out.append(dict(run_id=rid, status="no manifest (running or stopped)"))
                continue
            key = (rid, m.get("status"), m.get("wall_s"))
            if key not in self._runs_cache:
                m = redact(m)
                m.pop("parts", None)
                m["throughput"] = self._throughput(json.loads(storage.read_bytes(muri)))
                self._runs_cache[key] = m
            out.append(self._runs_cache[key])
        return sorted(out, key=lambda m: (m.get("started_at") or 0, m["run_id"]))

    def failures(self, error_type: str = "", run_id: str = "", source_uri: str = "",
                 limit: int = 500) -> dict:
        from jobs.sink import read_table_dir

        t = read_table_dir(storage.join(self.root, "failures"),
                           ["source_uri", "stage", "error_type", "message", "retryable", "run_id"])
        if t is None or t.num_rows == 0:
            return dict(counts={}, total=0, rows=[])
        if run_id:
            t = t.filter(pc.equal(t.column("run_id"), run_id))
        if source_uri:
            t = t.filter(pc.equal(t.column("source_uri"), source_uri))
        vc = pc.value_counts(t.column("error_type")).to_pylist()
        counts = dict(sorted((d["values"], d["counts"]) for d in vc))
        if error_type:
            t = t.filter(pc.equal(t.column("error_type"), error_type))
        t = t.sort_by([("source_uri", "ascending"), ("run_id", "ascending")])
        return dict(counts=counts, total=t.num_rows, rows=redact(t.slice(0, limit).to_pylist()))


# ------------------------------------------------------------------------------------ web app

class SpanError(ValueError):
    """A request for audio outside the part of a file a source id names."""


def _asset(name: str) -> bytes:
    return resources.files("overheard").joinpath("assets", "web", name).read_bytes()


def _pages() -> dict[str, bytes]:
    """Route -> HTML: each page's <main> (PAGES' file) inside the one shared frame (page.html:
    head, stylesheet, navigation, script), so the pages cannot drift apart."""
    frame = _asset("page.html")
    return {path: frame.replace(b"@PAGE@", name.encode())
                       .replace(b"@MAIN@", _asset(file).rstrip(b"\n"))
            for path, (file, name) in PAGES.items()}


def _err(status: int, msg: str):
    from aiohttp import web

    return web.json_response({"error": msg}, status=status)


async def _blocking(fn, *a):
    """``fn(*a)`` in the default executor: archive reads and decoding never block the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *a)


def _guard(cfg: ServeConfig):
    """Middleware: the token check (query, bearer header or the session cookie it sets) and the
    security headers on every response."""
    from aiohttp import web

    session = hmac.new(cfg.token.encode(), b"overheard serve session", "sha256").hexdigest()

    @web.middleware
    async def guard(request, handler):
        if cfg.token:
            supplied = (request.query.get("token")
                        or request.headers.get("Authorization", "").removeprefix("Bearer "))
            ok = (hmac.compare_digest(supplied.encode(), cfg.token.encode()) if supplied else
                  hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), session.encode()))
            if not ok:
                return _err(401, "token required")
        resp = await handler(request)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; media-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
        resp.headers["Referrer-Policy"] = "no-referrer"
        if cfg.token and request.query.get("token"):
            # the cookie holds a value derived from the token, so no response echoes the token
            resp.set_cookie(COOKIE, session, httponly=True, samesite="Strict")
        return resp

    return guard


class _Api:
    """The /api/* handlers over one archive; every parameter is checked before any read."""

    def __init__(self, cfg: ServeConfig, archive: Archive):
        self.cfg, self.archive = cfg, archive

    async def search(self, request):
        from aiohttp import web

        q = request.query.get("q", "").strip()
        try:
            k = int(request.query.get("k", "10"))
        except ValueError:
            return _err(400, "k must be an integer")
        if not 1 <= k <= self.cfg.max_k:
            return _err(400, f"k must be in 1..{self.cfg.max_k}")
        if not q:
            return web.json_response([])
        if len(q) > 500:
            return _err(400, "query longer than 500 characters")
        try:
            return web.json_response(await _blocking(self.archive.search, q, k))
        except (FileNotFoundError, ValueError) as e:  # no index yet / no CLAP recorded
            return _err(503, str(e).splitlines()[0])

    async def audio(self, request):
        from aiohttp import web

        uri = request.query.get("source_uri", "")
        try:
            a, b = float(request.query["start_s"]), float(request.query["end_s"])
        except (KeyError, ValueError):
            return _err(400, "start_s and end_s (seconds) are required")
        if uri not in self.archive.uris:  # the only check that matters: never open a request's path
            return _err(404, "no such source in the caption tables")
        if not (math.isfinite(a) and math.isfinite(b) and 0 <= a < b):
            return _err(400, "need 0 <= start_s < end_s")
        if b - a > self.cfg.max_span_s:
            return _err(400, f"span {b - a:g} s is longer than the {self.cfg.max_span_s:g} s cap")
        try:
            data = await _blocking(self.archive.audio_wav, uri, a, b)
        except SpanError as e:
            return _err(400, str(e))
        except MediaError as e:
            return _err(502, f"cannot decode the source: {e.error_type}")
        except OSError:
            return _err(502, "cannot read the source")
        return web.Response(body=data, content_type="audio/wav",
                            headers={"Cache-Control": "private, max-age=3600"})

    async def source(self, request):
        from aiohttp import web

        s = self.archive.source(request.query.get("source_uri", ""))
        if s is None:
            return _err(404, "no such source in the caption tables")
        return web.json_response(redact(s))

    async def runs(self, request):
        from aiohttp import web

        return web.json_response(await _blocking(self.archive.runs))

    async def failures(self, request):
        from aiohttp import web

        try:
            limit = min(max(int(request.query.get("limit", "500")), 1), 5000)
        except ValueError:
            return _err(400, "limit must be an integer")
        q = request.query
        return web.json_response(await _blocking(
            self.archive.failures, q.get("error_type", ""), q.get("run_id", ""), "", limit))


def make_app(cfg: ServeConfig, archive: Archive):
    """The aiohttp application (routes above); blocking work runs in the default executor."""
    from aiohttp import web

    pages = _pages()  # assets read once
    static_files = {n: _asset(n) for n in STATIC}

    def page(path):
        async def h(request):
            return web.Response(body=pages[path], content_type="text/html", charset="utf-8")
        return h

    async def static(request):
        name = request.match_info["name"]
        if name not in STATIC:
            return _err(404, "not found")
        return web.Response(body=static_files[name], content_type=STATIC[name], charset="utf-8")

    api = _Api(cfg, archive)
    app = web.Application(middlewares=[_guard(cfg)])
    for path in PAGES:
        app.router.add_get(path, page(path))
    app.router.add_get("/static/{name}", static)
    for name in ("search", "audio", "source", "runs", "failures"):
        app.router.add_get(f"/api/{name}", getattr(api, name))
    return app


def default_index(output: str) -> str:
    if storage.protocol_of(output) == "file":
        from jobs.index import captions_dir

        return os.path.join(captions_dir(output)[1], "search-index")
    return os.path.join(os.path.expanduser("~/.cache/overheard/index"),
                        storage.short_hash(output.rstrip("/")))


def prepare_index(cfg: ServeConfig) -> str:
    """``cfg.index``, or the default index of OUTPUT, built/updated by ``jobs.index.run``."""
    if cfg.index:
        return cfg.index
    from jobs.index import IndexConfig, run

    idx = default_index(cfg.output)
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    s = run(IndexConfig(captions=cfg.output, index=idx, clap=cfg.clap))
    ray = sys.modules.get("ray")
    if ray is not None and not ray_was_up and ray.is_initialized():
        ray.shutdown()  # started for the index job only: the server does not need its ~500 MB
    print(f"index {idx}: {s['parts_new']} new parts, {s['rows_added']} rows added, "
          f"{s['rows_total']} in all", file=sys.stderr)
    return idx


async def start(cfg: ServeConfig, archive: Archive):
    """Start serving on the running loop; returns (runner, base URL)."""
    from aiohttp import web

    runner = web.AppRunner(make_app(cfg, archive), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host if ':' not in host else f'[{host}]'}:{port}/"


def main(argv: list[str] | None = None) -> int:
    cfg = parse(ServeConfig, argv, "overheard serve", __doc__.split("\n\n")[0])
    from jobs.index import captions_dir

    if not _parts(captions_dir(cfg.output)[0]):  # before starting Ray or creating anything
        print(f"overheard serve: no caption parts under {cfg.output}", file=sys.stderr)
        return 2
    idx = prepare_index(cfg)
    archive = Archive(cfg.output, idx, cfg.clap)
    try:  # load the CLAP text tower now, not on the first query
        archive.search("warm up", 1)
    except (FileNotFoundError, ValueError) as e:  # no index rows / no CLAP: pages still work
        print(f"search unavailable: {str(e).splitlines()[0]}", file=sys.stderr)

    async def serve():
        runner, url = await start(cfg, archive)
        print(f"serving {cfg.output} ({archive.rows.num_rows} windows, {len(archive.uris)} "
              f"files) on {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
