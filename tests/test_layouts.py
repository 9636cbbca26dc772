"""Archive layouts through the caption job on real parts: WebDataset shards built with tarfile
(what users do), Hugging Face-layout Parquet built with pyarrow, NeMo JSONL manifests; real media
from the media factory, a local Ray, the loopback S3 server (shards and Parquet are read from
it), Parquet read back."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests import media_factory as mf
from tests.test_caption_job import expected_windows, read_dir


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Clips of exact lengths (countable windows) shared by every layout below."""
    d = tmp_path_factory.mktemp("clips")
    clips = {
        "a.flac": (mf.make_tone(d / "a.flac", seconds=23.0, sr=16000, freq=440), 23.0),
        "b.wav": (mf.make_tone(d / "b.wav", seconds=4.0, sr=16000, freq=660), 4.0),
        "c.ogg": (mf.make_tone(d / "c.ogg", seconds=12.0, sr=48000, freq=880), 12.0),
    }
    return {k: (p.read_bytes(), secs) for k, (p, secs) in clips.items()}, d


def build_shards(d, media) -> dict:
    """s0.tar: 3 clips (two with .json/.txt companions), one corrupt member, a directory and a
    symlink member; s1.tar.gz: 2 clips + a .cls companion; broken.tar: random bytes.
    Returns {member uri: duration or None (must fail)}."""
    clips, _ = media
    d.mkdir(parents=True, exist_ok=True)
    want = {}
    with tarfile.open(d / "s0.tar", "w") as tf:
        dt = tarfile.TarInfo("sub")
        dt.type = tarfile.DIRTYPE
        tf.addfile(dt)
        _add(tf, "sub/000.flac", clips["a.flac"][0])
        _add(tf, "sub/000.json", json.dumps({"caption": "a steady tone", "id": 7}).encode())
        _add(tf, "sub/000.txt", b"tone in the room")
        _add(tf, "sub/001.wav", clips["b.wav"][0])
        _add(tf, "sub/002.wav", b"RIFF" + os.urandom(3000))  # corrupt member
        lk = tarfile.TarInfo("sub/003.wav")
        lk.type = tarfile.SYMTYPE
        lk.linkname = "/etc/passwd"  # never followed, never a source
        tf.addfile(lk)
        _add(tf, "sub/004.ogg", clips["c.ogg"][0])
    for name, secs in (("sub/000.flac", 23.0), ("sub/001.wav", 4.0), ("sub/002.wav", None),
                       ("sub/004.ogg", 12.0)):
        want[f"{d / 's0.tar'}#{name}"] = secs
    with tarfile.open(d / "s1.tar.gz", "w:gz") as tf:
        _add(tf, "k1.ogg", clips["c.ogg"][0])
        _add(tf, "k1.cls", b"3")
        _add(tf, "k2.wav", clips["b.wav"][0])
    want[f"{d / 's1.tar.gz'}#k1.ogg"] = 12.0
    want[f"{d / 's1.tar.gz'}#k2.wav"] = 4.0
    (d / "broken.tar").write_bytes(os.urandom(5000))
    want[str(d / "broken.tar")] = None
    return want


def build_hf(d, media) -> dict:
    """train-0000{0,1}-of-00002.parquet in the HF datasets layout (audio struct{bytes, path}),
    row groups of 2 rows; one row with garbage bytes, one with only a path (never followed);
    train-broken.parquet: garbage after the magic bytes."""
    clips, _ = media
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        [("a.flac", clips["a.flac"][0], "a tone"), ("b.wav", clips["b.wav"][0], "short tone"),
         ("bad.wav", b"RIFF" + os.urandom(500), "garbage")],
        [("/home/author/c.ogg", None, "path only"), ("c.ogg", clips["c.ogg"][0], "high tone")],
    ]
    want = {}
    for i, shard in enumerate(rows):
        t = pa.table({
            "audio": pa.array([{"bytes": b, "path": p} for p, b, _ in shard],
                              pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "sentence": [s for _, _, s in shard],
        })
        path = d / f"train-0000{i}-of-00002.parquet"
        pq.write_table(t, path, row_group_size=2)
        dur = {"a.flac": 23.0, "b.wav": 4.0, "c.ogg": 12.0}
        if i == 1:  # a Parquet file whose footer is garbage: one failure row for the file
            (d / "train-broken.parquet").write_bytes(b"PAR1" + os.urandom(2000))
            want[str(d / "train-broken.parquet")] = None
        for r, (p, b, _) in enumerate(shard):
            want[f"{path}#{r}"] = dur.get(p) if b is not None else None
    return want


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A bucket of this module's own: other tests list the shared bucket's keys."""
    s3_server.fs().mkdir("overheard-layouts")
    return "overheard-layouts"


@pytest.fixture(scope="module")
def layout_run(ray_local, s3_server, bucket, tiny_model, media, tmp_path_factory):
    """Shards + HF Parquet files in one prefix of the loopback S3 server. The caption job runs
    three times: limited to 3 sources (as if stopped early), then to the end, then again (must
    add nothing). One layout run shared by the tests below (each run costs ~10 s idle)."""
    from jobs.caption import CaptionConfig, run

    fs = s3_server.fs()
    root = tmp_path_factory.mktemp("layouts")
    local = root / "in"
    want = build_shards(local / "shards", media)
    want.update(build_hf(local / "hf", media))
    fs.put(str(local) + "/", f"{bucket}/layouts/", recursive=True)
    base = f"s3://{bucket}/layouts"
    want = {u.replace(str(local), base): secs for u, secs in want.items()}
    out = str(root / "out")
    cfg = CaptionConfig(input=base + "/", output=out, model=tiny_model, progress=False, show=0)
    m0 = run(dataclasses.replace(cfg, limit=3))
    m1 = run(cfg)
    caps = read_dir(os.path.join(out, "captions"))
    fails = read_dir(os.path.join(out, "failures"))
    m2 = run(cfg)
    return dict(want=want, out=out, m0=m0, m1=m1, m2=m2, caps=caps, fails=fails, base=base)


def test_shards_and_hf_parquet_one_row_per_window(layout_run):
    caps, fails, want = layout_run["caps"], layout_run["fails"], layout_run["want"]
    keys = list(zip(caps["source_uri"].to_pylist(), caps["window_index"].to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate rows"
    for uri, secs in want.items():
        rows = caps.filter(pc.equal(caps["source_uri"], uri))
        if secs is None:
            assert rows.num_rows == 0, uri
            continue
        assert rows.num_rows == expected_windows(secs), uri
        assert rows["end_s"].to_pylist()[-1] == pytest.approx(secs, abs=0.02), uri
    # nothing but the expected sources (no directory, symlink or companion became a source)
    assert set(caps["source_uri"].to_pylist()) == {u for u, s in want.items() if s}
    # every source that must fail has exactly one failure row, and nothing else fails
    assert sorted(fails["source_uri"].to_pylist()) == sorted(u for u, s in want.items() if not s)
    by = {r["source_uri"]: r for r in fails.to_pylist()}
    shards, hf = layout_run["base"] + "/shards", layout_run["base"] + "/hf"
    assert by[f"{shards}/s0.tar#sub/002.wav"]["error_type"] == "corrupt"
    assert by[f"{shards}/broken.tar"]["error_type"] == "corrupt"
    assert "unreadable shard" in by[f"{shards}/broken.tar"]["message"]
    assert by[f"{hf}/train-00000-of-00002.parquet#2"]["error_type"] == "corrupt"
    path_only = by[f"{hf}/train-00001-of-00002.parquet#0"]
    assert path_only["error_type"] == "no_audio_track" and "not followed" in path_only["message"]
    assert not any(r["retryable"] for r in by.values())
    m0, m = layout_run["m0"], layout_run["m1"]
    assert m["status"] == "completed" and m0["windows"] + m["windows"] == caps.num_rows
    assert m["sources_listed"] == len(want)


def test_source_meta_carries_companions_and_row_fields(layout_run):
    caps = layout_run["caps"]
    shards, hf = layout_run["base"] + "/shards", layout_run["base"] + "/hf"

    def meta(uri):
        vals = set(caps.filter(pc.equal(caps["source_uri"], uri))["source_meta"].to_pylist())
        assert len(vals) == 1, (uri, vals)  # the same on every window of a source
        v = vals.pop()
        return None if v is None else json.loads(v)

    assert meta(f"{shards}/s0.tar#sub/000.flac") == {
        "__key__": "sub/000", "json": {"caption": "a steady tone", "id": 7},
        "txt": "tone in the room"}
    assert meta(f"{shards}/s0.tar#sub/001.wav") is None
    assert meta(f"{shards}/s1.tar.gz#k1.ogg") == {"__key__": "k1", "cls": "3"}
    assert meta(f"{hf}/train-00000-of-00002.parquet#1") == {"path": "b.wav",
                                                            "sentence": "short tone"}
    assert meta(f"{hf}/train-00001-of-00002.parquet#1")["path"] == "c.ogg"
    # the column is in the schema (nullable); source versions are the container's
    from overheard.schema import caption_schema
    assert caps.schema.field("source_meta").type == pa.string()
    assert caption_schema(None).field("source_meta").nullable
    s0 = caps.filter(pc.starts_with(caps["source_uri"], f"{shards}/s0.tar#"))
    assert len(set(s0["source_version"].to_pylist())) == 1  # the shard's ETag
    assert all(v and ":" not in v for v in caps["source_version"].to_pylist())


def test_resume_and_rerun_exactly_once(layout_run):
    """The stopped run's 3 sources are skipped by the next run, which does the rest; the third
    run adds nothing (rows counted above: one per window, no duplicates)."""
    m0, m1, m2 = layout_run["m0"], layout_run["m1"], layout_run["m2"]
    assert m0["sources_todo"] == 3 and m0["sources_listed"] == len(layout_run["want"])
    assert m1["sources_skipped_done"] == 3 and m1["sources_todo"] == len(layout_run["want"]) - 3
    assert m2["sources_todo"] == 0 and m2["windows"] == 0
    assert m2["sources_skipped_done"] == m2["sources_listed"] == len(layout_run["want"])
    assert read_dir(os.path.join(layout_run["out"], "captions")).num_rows == \
        layout_run["caps"].num_rows


def test_serve_plays_shard_members_and_parquet_rows(layout_run, media, monkeypatch):
    """``overheard serve`` on this run's output (shards and HF Parquet on the S3 server): its
    /api/audio opens a tar member, a .tar.gz member and a Parquet row by id
    (``layouts.open_by_id``) and returns the job reader's samples of the captioned window,
    decoded here from the clip's own bytes; a tar shard's header index is read once per shard."""
    from jobs.serve import Archive, ServeConfig
    from overheard.layouts import by_id
    from overheard.media import TARGET_SR, iter_audio
    from tests.test_serve import Server, _wav, api

    clips, _ = media
    caps, out = layout_run["caps"].to_pylist(), layout_run["out"]
    shards, hf = layout_run["base"] + "/shards", layout_run["base"] + "/hf"
    walks = []
    walk = by_id._walk_tar
    monkeypatch.setattr(by_id, "_walk_tar", lambda *a: walks.append(1) or walk(*a))
    monkeypatch.setattr(by_id, "_tar_index", by_id.OrderedDict())
    srv = Server(ServeConfig(output=out, port=0), Archive(out, ""))
    try:
        for uri, clip in [(f"{shards}/s0.tar#sub/000.flac", "a.flac"),
                          (f"{shards}/s0.tar#sub/004.ogg", "c.ogg"),
                          (f"{shards}/s1.tar.gz#k1.ogg", "c.ogg"),
                          (f"{hf}/train-00000-of-00002.parquet#0", "a.flac"),
                          (f"{hf}/train-00001-of-00002.parquet#1", "c.ogg")]:
            r = [x for x in caps if x["source_uri"] == uri and x["window_index"] == 1][0]
            st, h, body = api(srv.url, "/api/audio", source_uri=uri, start_s=r["start_s"],
                              end_s=r["end_s"])
            assert st == 200 and h["Content-Type"] == "audio/wav", (uri, body[:200])
            sr, ch, x = _wav(body)
            full = np.concatenate(list(iter_audio(io.BytesIO(clips[clip][0]), TARGET_SR)))
            a, b = round(r["start_s"] * TARGET_SR), round(r["end_s"] * TARGET_SR)
            want = (np.clip(full[a:b], -1, 1) * 32767).round().astype(np.int16)
            assert (sr, ch, len(x)) == (48000, 1, b - a) and np.array_equal(x, want), uri
            assert np.abs(x).max() > 1000  # a tone, not silence
        assert len(walks) == 1  # s0.tar indexed once for its two members (the .tar.gz streams)
        # ids only in the failures table, or never captioned, are refused before any opening
        for uri in [f"{hf}/train-00001-of-00002.parquet#0", f"{shards}/s0.tar#sub/003.wav",
                    f"{shards}/s0.tar#../../etc/passwd", f"{hf}/train-00000-of-00002.parquet#9"]:
            assert api(srv.url, "/api/audio", source_uri=uri, start_s=0, end_s=1)[0] == 404, uri
    finally:
        srv.stop()


def test_open_by_id_failures_and_cache_bound(media, tmp_path, monkeypatch):
    """Plain files are not layout ids; a member or row the container no longer has, a row with
    only a path and a damaged shard each raise one clear error; the shard index cache is bounded
    and keyed by the shard's version (a rewritten shard is re-indexed)."""
    from overheard import layouts
    from overheard.layouts import by_id
    from overheard.media import MediaError

    build_shards(tmp_path / "shards", media)
    build_hf(tmp_path / "hf", media)
    s0, hf1 = tmp_path / "shards" / "s0.tar", tmp_path / "hf" / "train-00001-of-00002.parquet"
    monkeypatch.setattr(by_id, "_tar_index", by_id.OrderedDict())
    monkeypatch.setattr(by_id, "TAR_INDEX_CACHE", 1)
    assert layouts.open_by_id(str(tmp_path / "a#b.flac")) is None
    assert layouts.parse_id(f"{s0}#dir/x#1.flac") == ("tar", str(s0), "dir/x#1.flac")
    assert layouts.parse_id(f"{hf1}#t=1.5,3") == ("span", str(hf1), "t=1.5,3")
    with layouts.open_by_id(f"{s0}#sub/001.wav") as f:
        assert f.read() == media[0]["b.wav"][0]
    for uri, exc, text in [(f"{s0}#sub/999.wav", FileNotFoundError, "not in the shard"),
                           (f"{hf1}#7", FileNotFoundError, "no such row"),
                           (f"{hf1}#0", MediaError, "no embedded audio"),
                           (f"{tmp_path}/shards/broken.tar#x.wav", MediaError, "unreadable")]:
        with pytest.raises(exc, match=text):
            layouts.open_by_id(uri)
    assert len(by_id._tar_index) == 1  # broken.tar raised before caching; bound is 1
    # rewrite s0.tar with other content: a new version, so the stale offsets are not used
    with tarfile.open(s0, "w") as tf:
        _add(tf, "pad.bin", os.urandom(5000))
        _add(tf, "sub/001.wav", media[0]["a.flac"][0])
    os.utime(s0, (1, 1))
    with layouts.open_by_id(f"{s0}#sub/001.wav") as f:
        assert f.read() == media[0]["a.flac"][0]
    assert len(by_id._tar_index) == 1


def test_jsonl_manifest_spans(ray_local, tiny_model, media, tmp_path):
    """NeMo manifest: spans of one file are distinct sources whose windows carry the file's own
    times and cover only the span; a bad line is one failure row; rerun adds nothing."""
    from jobs.caption import CaptionConfig, run

    _, d = media
    lines = [
        {"audio_filepath": str(d / "a.flac"), "offset": 3.5, "duration": 12.0, "text": "first"},
        {"audio_filepath": "a.flac", "offset": 15.5, "duration": 7.5, "text": "second"},
        {"audio_filepath": "b.wav", "duration": 4.0},
        {"audio_filepath": str(d / "a.flac"), "offset": 3.5, "duration": 12.0, "text": "first"},
    ]
    # relative paths resolve against the manifest's folder: put the manifest beside the clips
    man = d / "train_manifest.json"
    man.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"offset\": 1}\n")
    out = str(tmp_path / "out")
    cfg = CaptionConfig(input=str(man), output=out, model=tiny_model, progress=False, show=0)
    m = run(cfg)
    caps = read_dir(os.path.join(out, "captions"))
    spans = {f"{d / 'a.flac'}#t=3.5,15.5": (3.5, 15.5), f"{d / 'a.flac'}#t=15.5,23": (15.5, 23.0),
             f"{d / 'b.wav'}#t=0,4": (0.0, 4.0)}
    assert set(caps["source_uri"].to_pylist()) == set(spans)
    for uri, (a, b) in spans.items():
        rows = caps.filter(pc.equal(caps["source_uri"], uri)).sort_by("window_index")
        assert rows.num_rows == expected_windows(b - a), uri
        assert rows["start_s"].to_pylist() == pytest.approx([a + 10.0 * i for i in
                                                             range(rows.num_rows)])
        assert rows["end_s"].to_pylist()[-1] == pytest.approx(b, abs=0.02)
    assert json.loads(caps.filter(pc.equal(caps["source_uri"], f"{d / 'a.flac'}#t=15.5,23"))[
        "source_meta"][0].as_py()) == {"text": "second"}
    fails = read_dir(os.path.join(out, "failures")).to_pylist()
    assert [f["source_uri"] for f in fails] == [f"{man}#line=5"]
    assert "audio_filepath" in fails[0]["message"] and not fails[0]["retryable"]
    assert m["sources_listed"] == 4  # the duplicate line is one source
    # overheard serve plays a span id from the plain file at the window's file times: the
    # samples of the full decode (window 1 of a.flac#t=3.5,15.5 is 13.5-15.5 s)
    from jobs.serve import Archive
    from tests.test_serve import _decode_span, _wav
    uri = f"{d / 'a.flac'}#t=3.5,15.5"
    r = caps.filter(pc.equal(caps["source_uri"], uri)).sort_by("window_index").to_pylist()[1]
    _, _, x = _wav(Archive(out, "").audio_wav(uri, r["start_s"], r["end_s"]))
    assert np.array_equal(x, _decode_span(str(d / "a.flac"), r["start_s"], r["end_s"]))
    assert len(x) == round((r["end_s"] - r["start_s"]) * 48000) and np.abs(x).max() > 1000
    from jobs.serve import SpanError
    from overheard.layouts import span_bounds
    assert span_bounds(uri) == (3.5, 15.5) and span_bounds(str(d / "a.flac"))[1] == math.inf
    for a, b in [(0.0, 2.0), (14.0, 16.0)]:  # the file around the span is not played
        with pytest.raises(SpanError):
            Archive(out, "").audio_wav(uri, a, b)
    m2 = run(cfg)
    assert m2["sources_todo"] == 0 and m2["windows"] == 0


def test_span_samples_match_the_full_decode(media):
    """Seeking to the span start gives the same samples as decoding from 0 and slicing
    (measured: bit-exact for flac and ogg; a 16-kHz wav differs in its first ~0.2 ms, where the
    resampler restarts). mp3 is not tested here: FFmpeg places frames after a seek ~25 ms off
    (its encoder delay), see README."""
    from overheard.media import decode_windows

    _, d = media
    for name in ("a.flac", "c.ogg", "b.wav"):
        full = np.concatenate([w.samples for w in decode_windows(str(d / name), window_s=1.0)])
        a, b = 1.25, 3.75
        ws = list(decode_windows(str(d / name), window_s=1.0, start_s=a, end_s=b))
        assert [round(w.start_s, 6) for w in ws] == [1.25, 2.25, 3.25]
        assert ws[-1].end_s == pytest.approx(b)
        got = np.concatenate([w.samples[: int(round((w.end_s - w.start_s) * 48000))] for w in ws])
        i = int(round(a * 48000))
        ref = full[i:i + got.size]
        # the resampler restarts at the seek: its first samples differ (16-kHz wav: 11 of the
        # first 32 samples, by up to 0.012 at amplitude 0.25); after that they agree
        np.testing.assert_allclose(got[32:], ref[32:], atol=1e-3, err_msg=name)
        np.testing.assert_allclose(got[:32], ref[:32], atol=0.03, err_msg=name)


class CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, f):
        self.f, self.read_bytes = f, 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.read_bytes += len(b)
        return b

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_tar_members_are_ranged_reads(media, tmp_path, monkeypatch):
    """Indexing a shard reads headers (and small companions), seeking over member data; a member
    opens as a sub-file that reads only its own range."""
    from overheard import layouts
    from overheard.layouts import listing, opening
    from overheard.media import decode_windows

    clips, _ = media
    big = clips["a.flac"][0]
    shard = tmp_path / "big.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(20):
            _add(tf, f"{i:03d}.flac", big)
            _add(tf, f"{i:03d}.json", b'{"i": %d}' % i)
    size = shard.stat().st_size
    opened = []
    real_open = open

    def counting_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if str(path) == str(shard) and "b" in mode:
            f = CountingFile(f)
            opened.append(f)
        return f

    for mod in (listing, opening):  # the indexer's and the member opener's open()
        monkeypatch.setattr(mod, "open", counting_open, raising=False)
    srcs = layouts.index_shard(str(shard), "v", size, (".flac",))
    assert len(srcs) == 20 and all(s[3]["kind"] == "tar" for s in srcs)
    # measured: 20 headers + 20 companions = 40 x 512 B (+ tarfile's record reads) of 1.8 MB
    assert opened[0].read_bytes < 0.05 * size, (opened[0].read_bytes, size)
    uri, _, n, loc = srcs[7]
    (_, located), = layouts.iter_sources(uri, loc)
    f = located.open()
    ws = list(decode_windows(f, window_s=10.0))
    assert len(ws) == expected_windows(23.0)
    assert opened[-1].read_bytes <= n  # never beyond the member
    assert json.loads(loc["meta"])["json"] == {"i": 7}


def test_truncated_shards(media, tmp_path):
    """A .tar.gz cut part-way: members streamed before the cut are captioned, each later one is
    one failure row. A .tar cut inside a member: that member fails (truncated/corrupt), the shard
    gets one failure row (its end is missing) and the members before it decode."""
    from actors.windows import decode_sources
    from jobs.caption import _layout_blocks
    from overheard import layouts

    clips, _ = media
    gz = tmp_path / "cut.tar.gz"
    with tarfile.open(gz, "w:gz", compresslevel=1) as tf:
        for i in range(3):
            _add(tf, f"{i}.wav", clips["b.wav"][0])
    data = gz.read_bytes()
    full = layouts.index_shard(str(gz), "", len(data), (".wav",))
    assert [s[0].rsplit("#", 1)[1] for s in full] == ["0.wav", "1.wav", "2.wav"]
    gz.write_bytes(data[: int(len(data) * 0.6)])  # member 0 whole, the rest cut
    rows = []
    for b in _layout_blocks(full, True):  # the listing of the whole shard, then the shard is cut
        for t in decode_sources(b, window_s=10.0):
            rows += t.drop_columns(["samples"]).to_pylist()
    ok = {r["source_uri"] for r in rows if r["window_index"] >= 0}
    bad = [r for r in rows if r["window_index"] < 0]
    assert ok == {f"{gz}#0.wav"}
    assert sorted(r["source_uri"] for r in bad) == [f"{gz}#1.wav", f"{gz}#2.wav"]
    assert all(r["error_type"] == "truncated" for r in bad), bad
    # listing the cut shard: the member before the cut, and one failure for the shard
    relisted = layouts.index_shard(str(gz), "v2", gz.stat().st_size, (".wav",))
    assert [s[3]["kind"] for s in relisted][-1] == "fail"
    assert relisted[-1][0] == str(gz) and "after member" in relisted[-1][3]["message"]

    tar = tmp_path / "cut.tar"
    with tarfile.open(tar, "w") as tf:
        _add(tf, "0.ogg", clips["c.ogg"][0])
        _add(tf, "1.flac", clips["a.flac"][0])
    srcs = layouts.index_shard(str(tar), "v", tar.stat().st_size, (".ogg", ".flac"))
    cut = srcs[1][3]["offset"] + srcs[1][2] // 2
    tar.write_bytes(tar.read_bytes()[:cut])
    rows = []
    for b in _layout_blocks(layouts.index_shard(str(tar), "", cut, (".ogg", ".flac")), True):
        for t in decode_sources(b, window_s=10.0):
            rows += t.drop_columns(["samples"]).to_pylist()
    fails = [r for r in rows if r["window_index"] < 0]
    by = {r["source_uri"]: r for r in fails}
    assert sorted(by) == [str(tar), f"{tar}#1.flac"]
    assert by[f"{tar}#1.flac"]["error_type"] in ("truncated", "corrupt")
    # tarfile finds the shard's end missing too: one failure row for the shard says where
    assert "after member 1.flac" in by[str(tar)]["error_message"]
    assert any(r["source_uri"] == f"{tar}#0.ogg" and r["n_windows"] == 2 for r in rows)


def test_store_outage_while_streaming_a_tgz_shard(s3_server, bucket, tmp_path):
    """The store goes away after the first member of a .tar.gz shard was decoded: the members
    not yet streamed are each one retryable read_error (never 'truncated'), and streaming the
    shard again once the store is back decodes them."""
    import wave

    from actors.windows import decode_sources
    from jobs.caption import _layout_blocks
    from overheard import layouts
    from overheard.schema import RETRYABLE

    # 3 members of 120 s 16-kHz noise (3.8 MB each; noise does not compress), so the 11.5-MB
    # shard spans two of the reader's 8-MiB blocks and the third member needs a new request
    rng = np.random.default_rng(0)
    gz = tmp_path / "noise.tar.gz"
    with tarfile.open(gz, "w:gz", compresslevel=1) as tf:
        for i in range(3):
            b = io.BytesIO()
            with wave.open(b, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes((rng.standard_normal(120 * 16000) * 3000).astype("<i2").tobytes())
            _add(tf, f"{i}.wav", b.getvalue())
    fs = s3_server.fs()
    fs.put(str(gz), f"{bucket}/outage-tgz/noise.tar.gz")
    uri = f"s3://{bucket}/outage-tgz/noise.tar.gz"
    srcs = layouts.list_located(uri, (".wav",))
    assert [s[0] for s in srcs] == [f"{uri}#{i}.wav" for i in range(3)]
    (block,) = _layout_blocks(srcs, True)
    rows = []
    try:
        for t in decode_sources(block, window_s=10.0):
            rows += t.drop_columns(["samples"]).to_pylist()
            if any(r["n_windows"] > 0 for r in rows):
                s3_server.outage()  # member 0 is complete: the store goes away
    finally:
        s3_server.restore()
    done = {r["source_uri"] for r in rows if r["n_windows"] == 12}
    fails = {r["source_uri"]: r for r in rows if r["window_index"] < 0}
    assert f"{uri}#0.wav" in done
    assert fails, "the outage broke no read; the test proves nothing"
    assert set(done) | set(fails) == {s[0] for s in srcs} and not set(done) & set(fails)
    assert all(f["error_type"] in RETRYABLE for f in fails.values()), fails
    again = [s for s in srcs if s[0] in fails]
    rows = []
    for b in _layout_blocks(again, True):
        for t in decode_sources(b, window_s=10.0):
            rows += t.drop_columns(["samples"]).to_pylist()
    assert {r["source_uri"] for r in rows if r["n_windows"] == 12} == set(fails)
