"""``overheard serve`` on a real caption output: the caption job (the shipped sound-world model)
runs on generated scenes and clips from a local folder and from the suite's S3 server, the
server builds its index itself (the index job), the HTTP API is checked for what it returns
and refuses, and a real headless Chromium loads the pages (search results, audio bytes behind
the player, the runs plot, the failures filter). Set OVERHEARD_WRITE_DOCS=1 to refresh the
README's screenshots."""

from __future__ import annotations

import asyncio
import html
import io
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import wave

import numpy as np
import pytest

from tests import media_factory as mf

API_FIELDS = {"source_uri", "window_index", "start_s", "end_s", "caption", "confidence", "score"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    """``jobs.serve.start`` on its own event loop in a thread (port 0: a free port)."""

    def __init__(self, cfg, archive):
        from jobs.serve import start
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner, self.url = asyncio.run_coroutine_threadsafe(
            start(cfg, archive), self.loop).result(60)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def get(url, headers=None):
    """(status, headers, body) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def api(base, path, **params):
    return get(base + path.lstrip("/") + ("?" + urllib.parse.urlencode(params) if params else ""))


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_local, s3_server, s3_bucket):
    from jobs.caption import DEFAULT_MODEL, CaptionConfig, run
    from jobs.serve import Archive, ServeConfig, prepare_index

    from overheard.soundworld import write_dataset

    root = tmp_path_factory.mktemp("serve")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    # 4 sound-world scenes (10 s each) for the shipped sound-world model to caption, a stereo
    # tone of 3 windows, a broken file (one "corrupt" failure row) and a tone on the S3 server
    world = write_dataset(str(root / "world"), 4, seed=3, split="serve")
    mf.make_tone(str(inp / "tone_a.wav"), seconds=25.0, freq=440, channels=2)
    (inp / "broken.flac").write_bytes(bytes(range(256)) * 16)
    fs = s3_server.fs()
    s3_in = f"{s3_bucket}/serve-in"
    mf.make_tone(str(root / "tone_s3.flac"), seconds=12.0, freq=1200)
    fs.put(str(root / "tone_s3.flac"), f"{s3_in}/tone_s3.flac")
    s3_uri = f"s3://{s3_in}/tone_s3.flac"
    # one run over a manifest naming local files and an S3 object (each caption run pays ~20 s
    # of actor start-up, so one run, not two)
    manifest = root / "sources.csv"
    files = sorted(str(p) for p in inp.iterdir()) + sorted(
        os.path.join(world, f) for f in os.listdir(world) if f.endswith(".flac"))
    manifest.write_text("uri\n" + "".join(f"{u}\n" for u in files + [s3_uri]))
    m1 = run(CaptionConfig(input=str(manifest), output=str(out), model=DEFAULT_MODEL,
                           progress=False, show=0, flush_interval=600, run_id="run-1"))
    cfg = ServeConfig(output=str(out), port=0)
    idx = prepare_index(cfg)  # no --index: builds OUTPUT/search-index with the index job
    archive = Archive(str(out), idx)
    srv = Server(cfg, archive)
    yield dict(root=root, inp=inp, out=out, url=srv.url, index=idx, m1=m1, s3_uri=s3_uri)
    srv.stop()


def _captions(out):
    from jobs.sink import read_table_dir
    return read_table_dir(os.path.join(str(out), "captions")).to_pylist()


def _decode_span(uri, start_s, end_s):
    """What the job's reader yields for the span, as 16-bit ints (the WAV's sample format)."""
    from overheard import storage
    from overheard.media import TARGET_SR, iter_audio
    with storage.open_input(uri) as f:
        x = np.concatenate(list(iter_audio(f, TARGET_SR)))
    a, b = round(start_s * TARGET_SR), round(end_s * TARGET_SR)
    return (np.clip(x[a:b], -1, 1) * 32767).round().astype(np.int16)


def _wav(body):
    with wave.open(io.BytesIO(body)) as w:
        return w.getframerate(), w.getnchannels(), np.frombuffer(w.readframes(w.getnframes()),
                                                                 "<i2")


def test_index_built_inside_output_and_search_api(served):
    rows = _captions(served["out"])
    assert served["index"] == os.path.join(str(served["out"]), "search-index")
    assert os.path.exists(os.path.join(served["index"], "overheard_index.json"))
    st, h, body = api(served["url"], "/api/search", q="a dog barks", k=4)
    assert st == 200 and h["Content-Type"].startswith("application/json")
    hits = json.loads(body)
    assert 0 < len(hits) <= 4
    by_key = {(r["source_uri"], r["window_index"]): r for r in rows}
    for hit in hits:
        assert set(hit) == API_FIELDS
        r = by_key[(hit["source_uri"], hit["window_index"])]  # every hit is a captioned window
        assert (hit["start_s"], hit["end_s"], hit["caption"]) == (r["start_s"], r["end_s"],
                                                                  r["caption"])
        # confidence comes from the caption parts when they carry it, else null
        assert hit["confidence"] == (None if r.get("confidence") is None
                                     else pytest.approx(r["confidence"], abs=1e-6))
    assert [x["score"] for x in hits] == sorted((x["score"] for x in hits), reverse=True)
    # a second serve reuses the index: nothing new to ingest
    from jobs.index import IndexConfig, run
    assert run(IndexConfig(captions=str(served["out"]), index=served["index"]))["parts_new"] == 0
    assert json.loads(api(served["url"], "/api/search", q="")[2]) == []
    assert api(served["url"], "/api/search", q="x", k=0)[0] == 400
    assert api(served["url"], "/api/search", q="x", k=101)[0] == 400
    assert api(served["url"], "/api/search", q="x", k="ten")[0] == 400


@pytest.mark.parametrize("which", ["local_stereo", "s3"])
def test_audio_is_the_captioned_window(served, which):
    """The WAV holds exactly the job reader's samples of that span (channel mean, 48 kHz)."""
    rows = _captions(served["out"])
    uri = (str(served["inp"] / "tone_a.wav") if which == "local_stereo" else served["s3_uri"])
    r = [x for x in rows if x["source_uri"] == uri][1]  # the second window: starts at 10 s
    assert r["start_s"] == pytest.approx(10.0)
    st, h, body = api(served["url"], "/api/audio", source_uri=uri, start_s=r["start_s"],
                      end_s=r["end_s"])
    assert st == 200 and h["Content-Type"] == "audio/wav" and body[:4] == b"RIFF"
    sr, ch, x = _wav(body)
    assert (sr, ch) == (48000, 1)
    want = _decode_span(uri, r["start_s"], r["end_s"])
    assert len(x) == len(want) == round((r["end_s"] - r["start_s"]) * 48000)
    assert np.array_equal(x, want)
    assert np.abs(x).max() > 1000  # a tone, not silence


@pytest.mark.parametrize("name,rate,channels", [("long.flac", 48000, 1),
                                                ("long.wav", 44100, 2)])
def test_late_span_is_found_by_seeking(tmp_path, monkeypatch, name, rate, channels):
    """Past 2 minutes ``read_span`` seeks instead of decoding from the start; on FLAC and PCM
    it returns the same samples as the job's from-the-start counting (44.1 kHz stereo: resampled
    and mixed by a fresh filter graph at the seek point, so compared with a tolerance)."""
    from overheard import span
    from overheard.media import iter_audio
    from overheard.span import read_span
    path = tmp_path / name
    mf.run(mf.FFMPEG + ["-f", "lavfi", "-i", f"anoisesrc=color=pink:sample_rate={rate}:"
                        f"amplitude=0.3:seed=7:duration=150", "-ac", str(channels), str(path)])
    full = np.concatenate(list(iter_audio(str(path))))
    want = full[round(130.0 * 48000):round(134.0 * 48000)]

    def no_fallback(*a):
        raise AssertionError("decoded from the start instead of seeking")
    monkeypatch.setattr(span, "_from_start", no_fallback)
    got = read_span(str(path), 130.0, 134.0)
    assert len(got) == len(want) == 4 * 48000
    if rate == 48000:
        assert np.array_equal(got, want)
    else:  # same placement (no lag), same samples to the resampler's filter transient
        lags = range(-48, 49)
        best = max(lags, key=lambda k: float(np.dot(got[480:-480], np.roll(want, k)[480:-480])))
        assert best == 0
        assert np.abs(got[480:] - want[480:]).max() < 1e-3
    with open(path, "rb") as f:  # a file object (the server's local and s3:// case)
        assert np.array_equal(read_span(f, 130.0, 134.0), got)


def test_audio_refuses_what_is_not_captioned(served):
    base, inp = served["url"], served["inp"]
    tone = str(inp / "tone_a.wav")
    for uri in ["/etc/passwd", "../../../../etc/passwd", "file:///etc/passwd",
                str(inp / ".." / "in" / "tone_a.wav"),       # same file, not the captioned URI
                tone + "/../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd",
                str(inp / "broken.flac"),                      # only in the failures table
                "s3://other-bucket/secret.wav", "http://127.0.0.1:1/x.wav", ""]:
        st, _, body = api(base, "/api/audio", source_uri=uri, start_s=0, end_s=1)
        assert st == 404, uri
        assert b"root:" not in body
    for a, b in [(0, 60.5), (5, 5), (3, 1), (-1, 1), ("nan", 1), (0, "inf"), ("x", 1)]:
        assert api(base, "/api/audio", source_uri=tone, start_s=a, end_s=b)[0] == 400, (a, b)
    assert api(base, "/api/audio", source_uri=tone)[0] == 400
    # static files come from a fixed list, not from the path
    for p in ["/static/../serve.py", "/static/%2e%2e%2fserve.py", "/static/index.html.bak",
              "/static/..%2f..%2fjobs%2fserve.py"]:
        assert get(base + p.lstrip("/"))[0] == 404, p
    assert api(base, "/api/source", source_uri="/etc/passwd")[0] == 404
    # a source with failures only has a page (its failure rows), still no audio
    broken = json.loads(api(base, "/api/source", source_uri=str(inp / "broken.flac"))[2])
    assert broken["windows"] == [] and broken["failures"]
    assert all(f["source_uri"] == str(inp / "broken.flac") for f in broken["failures"])


def test_source_runs_failures_api(served):
    base, out = served["url"], served["out"]
    tone = str(served["inp"] / "tone_a.wav")
    s = json.loads(api(base, "/api/source", source_uri=tone)[2])
    assert s["name"] == "tone_a.wav"
    assert [w["window_index"] for w in s["windows"]] == [0, 1, 2]  # 25 s in 10-s windows
    assert [w["end_s"] for w in s["windows"]] == [10.0, 20.0, 25.0]
    runs = json.loads(api(base, "/api/runs")[2])
    assert [m["run_id"] for m in runs] == ["run-1"]
    m, m0 = runs[0], served["m1"]
    assert m["windows"] == m0["windows"] == len(_captions(out)) == 4 + 3 + 2
    assert (m["audio_hours"], m["windows_per_s"]) == (m0["audio_hours"], m0["windows_per_s"])
    assert m["throughput"][0] == [0.0, 0]
    assert m["throughput"][-1][1] == m0["windows"]  # every window was committed in a part
    xs = [p[0] for p in m["throughput"]]
    assert xs == sorted(xs) and 0 < xs[-1] <= m0["wall_s"] + 1e-6
    assert m["failures_by_type"] == {"corrupt": 1}
    f = json.loads(api(base, "/api/failures")[2])
    assert f["counts"] == {"corrupt": 1} and f["total"] == 1
    assert f["rows"][0]["source_uri"] == str(served["inp"] / "broken.flac")
    f = json.loads(api(base, "/api/failures", error_type="timeout")[2])
    assert f["total"] == 0 and f["rows"] == [] and f["counts"] == {"corrupt": 1}


def test_no_credentials_in_responses(served, tmp_path):
    """A manifest naming a URI with user-info and a secret-looking key is served redacted; the
    S3 secret of the suite's server appears in no response."""
    from jobs.serve import Archive, ServeConfig
    out = tmp_path / "out"
    shutil.copytree(served["out"] / "captions", out / "captions")
    m = dict(json.load(open(served["out"] / "runs" / "run-1" / "manifest.json")),
             run_id="run-x", input="s3://AKIAEXAMPLE:topsecret-1@bucket/in/",
             storage_options={"secret": "topsecret-2"}, aws_secret_access_key="topsecret-3")
    (out / "runs" / "run-x").mkdir(parents=True)
    (out / "runs" / "run-x" / "manifest.json").write_text(json.dumps(m))
    cfg = ServeConfig(output=str(out), index=served["index"], port=0)
    srv = Server(cfg, Archive(str(out), served["index"]))
    try:
        body = api(srv.url, "/api/runs")[2]
        runs = {m["run_id"]: m for m in json.loads(body)}
        assert runs["run-x"]["input"] == "s3://***@bucket/in/"
        assert runs["run-x"]["storage_options"] == {}
        assert b"topsecret" not in body and b"overheard-test-secret" not in body
    finally:
        srv.stop()
    for path in ["/", "/runs", "/api/runs", "/api/failures", "/static/app.js"]:
        assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in get(served["url"] + path)[2]


def test_confidence_from_caption_parts(served, tmp_path):
    """Search hits carry the confidence the index holds (the caption job writes the column and
    the index carries it); the source page reads it from the caption parts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.serve import Archive
    real = {}
    (tmp_path / "out" / "captions").mkdir(parents=True)
    for f in sorted((served["out"] / "captions").glob("*.parquet")):
        t = pq.read_table(f)
        for r in t.select(["source_uri", "window_index", "confidence"]).to_pylist():
            real[(r["source_uri"], r["window_index"])] = r["confidence"]
        conf = pc.divide(pc.cast(t.column("window_index"), pa.float32()), pa.scalar(10.0,
                                                                                      pa.float32()))
        t = t.set_column(t.schema.get_field_index("confidence"), "confidence", conf)
        pq.write_table(t, tmp_path / "out" / "captions" / f.name)
    # the parts count through the commit log that lists them (jobs/sink.py)
    shutil.copytree(served["out"] / "_commits", tmp_path / "out" / "_commits")
    arc = Archive(str(tmp_path / "out"), served["index"])
    hits = arc.search("someone types on a keyboard", 9)
    assert len(hits) == 9
    assert [h["confidence"] for h in hits] == [
        pytest.approx(real[(h["source_uri"], h["window_index"])]) for h in hits]
    assert all(0.0 <= h["confidence"] <= 1.0 for h in hits)
    tone = arc.source(str(served["inp"] / "tone_a.wav"))
    assert [w["confidence"] for w in tone["windows"]] == [0.0, pytest.approx(0.1),
                                                          pytest.approx(0.2)]


def test_token(served):
    from jobs.serve import Archive, ServeConfig
    cfg = ServeConfig(output=str(served["out"]), index=served["index"], port=0, token="s3cr3t-t0k")
    srv = Server(cfg, Archive(str(served["out"]), served["index"]))
    try:
        u = srv.url
        for p in ["", "runs", "static/app.js", "api/runs", "api/search?q=dog"]:
            assert get(u + p)[0] == 401, p
            assert get(u + p, {"Authorization": "Bearer wrong"})[0] == 401, p
        st, h, body = get(u + "?token=s3cr3t-t0k")
        assert st == 200 and b"s3cr3t-t0k" not in body
        cookie = h["Set-Cookie"]
        assert "s3cr3t-t0k" not in cookie and "HttpOnly" in cookie
        c = cookie.split(";", 1)[0]
        assert get(u + "api/runs", {"Cookie": c})[0] == 200
        assert get(u + "api/runs", {"Cookie": "overheard_token=s3cr3t-t0k"})[0] == 401
        assert get(u + "api/runs", {"Authorization": "Bearer s3cr3t-t0k"})[0] == 200
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ a real browser

def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url, tmp, screenshot=None):
    """The DOM after the page's scripts ran (headless Chromium; virtual time lets the fetches
    finish before the dump)."""
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--mute-audio", f"--user-data-dir={tmp}",
            "--virtual-time-budget=20000", "--window-size=1100,900"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    r = subprocess.run(args + [url], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium "
                    "(scripts/setup.sh installs it)")
def test_pages_in_headless_chromium(served, tmp_path):
    base = served["url"]
    dom = browse(base + "?" + urllib.parse.urlencode({"q": "someone types on a keyboard"}),
                 tmp_path / "p1")
    hits = re.findall(r'<li class="hit">(.*?)</li>', dom, re.S)
    assert hits, dom[-3000:]
    first = hits[0]
    # the page shows the window's own caption (as text) under its file name
    name = html.unescape(re.search(r'class="file">([^<]+)</a>', first).group(1))
    cap = html.unescape(re.search(r'<div class="cap">([^<]*)</div>', first).group(1))
    assert cap in {r["caption"] for r in _captions(served["out"])
                   if os.path.basename(r["source_uri"]) == name}
    assert re.search(r"\d:\d\d\.\d–\d:\d\d\.\d", first)  # start–end
    assert "confidence" in first and "score 0." in first
    src = re.search(r'<audio[^>]* src="([^"]+)"', first).group(1).replace("&amp;", "&")
    st, h, body = get(base + src.lstrip("/"))
    assert st == 200 and body[:4] == b"RIFF"
    q = urllib.parse.parse_qs(urllib.parse.urlparse(src).query)
    sr, _, x = _wav(body)
    assert len(x) == round((float(q["end_s"][0]) - float(q["start_s"][0])) * sr)

    dom = browse(base + "runs", tmp_path / "p2")
    assert dom.count('<svg class="plot"') == 1 and dom.count("<polyline") == 1
    assert "hours captioned" in dom and "corrupt: 1" in dom
    assert re.search(r"<tbody><tr><td[^>]*>broken\.flac</td>", dom)
    dom = browse(base + "runs?error_type=timeout", tmp_path / "p3")
    assert "broken.flac" not in dom.split('id="failures"', 1)[1] and "0 rows" in dom

    tone = str(served["inp"] / "tone_a.wav")
    dom = browse(base + "source?" + urllib.parse.urlencode({"source_uri": tone, "w": 1}),
                 tmp_path / "p4")
    timeline = dom.split('id="timeline"', 1)[1].split("</div>", 1)[0]
    assert timeline.count("<button") == 3 and 'class="on"' in timeline

    png = tmp_path / "search.png"
    browse(base + "?" + urllib.parse.urlencode({"q": "someone types on a keyboard"}),
           tmp_path / "p5", screenshot=png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if os.environ.get("OVERHEARD_WRITE_DOCS") == "1":
        shutil.copy(png, os.path.join(ROOT, "docs", "serve-search.png"))
        browse(base + "runs", tmp_path / "p6",
               screenshot=os.path.join(ROOT, "docs", "serve-runs.png"))


def test_cli(tmp_path, capsys):
    from jobs.cli import COMMANDS, main
    from jobs.config_cli import parser_for
    from jobs.serve import ServeConfig
    assert COMMANDS["serve"][0] == "jobs.serve"
    a = parser_for(ServeConfig, "overheard serve", "").parse_args(["./out"])
    assert (a.host, a.port, a.token, a.index, a.max_span_s) == ("127.0.0.1", 8000, "", "", 60.0)
    # no caption output: one line, exit 2, nothing created
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"overheard serve: no caption parts under {tmp_path / 'nothing'}"
    assert not (tmp_path / "nothing").exists()
