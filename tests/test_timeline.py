"""Timelines (issue 16 item 5): merging adjacent windows, overlap midpoints, SRT/WebVTT/JSONL that
parse back with a strict parser, and the command end to end on a real caption run (the shipped
sound-world model on a 20-s recording made of two generated scenes with different sources)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pytest

from overheard import timeline as tl

SRT_TIME = r"(\d\d):([0-5]\d):([0-5]\d),(\d{3})"
VTT_TIME = r"(\d\d):([0-5]\d):([0-5]\d)\.(\d{3})"


def _secs(m, i):
    h, mi, s, ms = (int(x) for x in m.groups()[i:i + 4])
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_srt(text: str) -> list[dict]:
    """Strict SubRip: blocks separated by one blank line, index 1..n, ``a --> b`` with a <= b,
    at least one non-empty text line, file ends with a blank line."""
    assert text.endswith("\n\n") and not text.endswith("\n\n\n")
    cues = []
    for n, block in enumerate(text[:-2].split("\n\n"), 1):
        lines = block.split("\n")
        assert lines[0] == str(n), block
        m = re.fullmatch(SRT_TIME + " --> " + SRT_TIME, lines[1])
        assert m, lines[1]
        a, b = _secs(m, 0), _secs(m, 4)
        assert a <= b and len(lines) >= 3 and all(x.strip() for x in lines[2:])
        assert not any("-->" in x for x in lines[2:])
        cues.append(dict(start=a, end=b, text="\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[dict]:
    """Strict WebVTT: ``WEBVTT`` first line, blank line, then NOTE blocks and cues (optional id
    line, ``a --> b`` with a < b, text), blocks separated by blank lines."""
    assert text.startswith("WEBVTT\n\n") and text.endswith("\n\n")
    cues, notes = [], []
    for block in text[len("WEBVTT\n\n"):-2].split("\n\n"):
        lines = block.split("\n")
        if lines[0].startswith("NOTE"):
            notes.append(lines[0])
            continue
        if "-->" not in lines[0]:
            assert "-->" not in lines[0] and lines[0].strip()
            lines = lines[1:]
        m = re.fullmatch(VTT_TIME + " --> " + VTT_TIME, lines[0])
        assert m, lines[0]
        a, b = _secs(m, 0), _secs(m, 4)
        assert a < b and len(lines) >= 2 and all(x.strip() for x in lines[1:])
        assert not any("-->" in x for x in lines[1:])
        cues.append(dict(start=a, end=b, text="\n".join(lines[1:])))
    return cues + [{"notes": notes}]


def _rows(caps, window=2.0, hop=1.0, emb=None, conf=None, src="s3://b/a.wav"):
    n = len(caps)
    cols = dict(source_uri=[src] * n, model_id=["m"] * n, window_index=list(range(n)),
                start_s=[i * hop for i in range(n)], end_s=[i * hop + window for i in range(n)],
                caption=caps)
    t = pa.table(cols)
    if emb is not None:
        emb = np.asarray(emb, np.float32)
        t = t.append_column("audio_embedding", pa.FixedSizeListArray.from_arrays(
            pa.array(emb.ravel()), emb.shape[1]))
    if conf is not None:
        t = t.append_column("confidence", pa.array(conf, pa.float32()))
    return t


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_equal_captions_merge_and_overlaps_meet_at_the_midpoint():
    caps = ["A dog barks.", "a dog barks", "rain falls", "rain falls", "rain falls", "a siren"]
    segs = tl.segments(_rows(caps, window=2.0, hop=1.0)).to_pylist()
    assert [s["caption"] for s in segs] == ["A dog barks.", "rain falls", "a siren"]
    assert [(s["first_window"], s["last_window"], s["windows"]) for s in segs] == \
        [(0, 1, 2), (2, 4, 3), (5, 5, 1)]
    # window 1 = [1, 3], window 2 = [2, 4]: boundary at the midpoint of the overlap, 2.5
    assert [(s["start_s"], s["end_s"]) for s in segs] == [(0.0, 2.5), (2.5, 5.5), (5.5, 7.0)]
    assert all(s["confidence"] is None for s in segs)  # no confidence column: null, not made up
    # touching windows (hop = window): the boundary is where they touch
    segs = tl.segments(_rows(caps, window=2.0, hop=2.0)).to_pylist()
    assert [(s["start_s"], s["end_s"]) for s in segs] == [(0.0, 4.0), (4.0, 10.0), (10.0, 12.0)]
    # a gap (hop > window) stays uncovered
    segs = tl.segments(_rows(caps, window=2.0, hop=3.0)).to_pylist()
    assert [(s["start_s"], s["end_s"]) for s in segs] == [(0.0, 5.0), (6.0, 14.0), (15.0, 17.0)]


def test_embedding_rule_needs_both_similar_audio_and_similar_words():
    rng = np.random.default_rng(0)
    a, b = _unit(rng.standard_normal(16)), _unit(rng.standard_normal(16))
    near = _unit(a + 0.1 * _unit(rng.standard_normal(16)))   # cos(a, near) ~ 0.995
    assert float(a @ near) > 0.97 and abs(float(a @ b)) < 0.6
    caps = ["a small dog barks twice", "a small dog barks", "a small dog barks"]  # Jaccard 0.75
    # similar words + similar audio: one segment
    segs = tl.segments(_rows(caps, emb=[a, near, near]), words=0.5).to_pylist()
    assert len(segs) == 1 and segs[0]["caption"] == "a small dog barks"  # most frequent
    # similar words, different audio: split
    assert len(tl.segments(_rows(caps, emb=[a, b, b]), words=0.5)) == 2
    # similar audio, different words: split with a word threshold, one segment without (the
    # default, WORDS = 0: the audio decides)
    two = _rows(["a dog barks", "rain pours down"], emb=[a, near])
    assert len(tl.segments(two, words=0.5)) == 2 and len(tl.segments(two)) == 1
    # the same pair merges when the thresholds are relaxed, and splits at --sim above the cosine
    assert len(tl.segments(_rows(caps, emb=[a, b, b]), sim=-1.0)) == 1
    assert len(tl.segments(_rows(caps, emb=[a, near, near]), sim=0.9999)) == 2


def test_drift_is_measured_against_the_segment_mean():
    """Each window is close to the previous (cos 0.985) but the sequence turns 90 degrees: chaining
    on the previous window would make one segment; the mean rule splits it."""
    e0, e1 = np.eye(8)[0], np.eye(8)[1]
    ang = np.linspace(0, np.pi / 2, 10)
    emb = [np.cos(t) * e0 + np.sin(t) * e1 for t in ang]
    assert min(float(emb[i] @ emb[i + 1]) for i in range(9)) > 0.98
    caps = [f"an engine hums {i}" for i in range(10)]  # no two equal; Jaccard 0.5 each pair
    segs = tl.segments(_rows(caps, emb=emb), sim=0.95, words=0.5).to_pylist()
    assert 2 <= len(segs) <= 5
    assert segs[0]["first_window"] == 0 and segs[-1]["last_window"] == 9


def test_confidence_is_the_mean_of_the_windows_and_null_stays_null():
    caps = ["rain", "rain", "dog", "dog"]
    segs = tl.segments(_rows(caps, conf=[0.5, 0.7, None, None])).to_pylist()
    assert segs[0]["confidence"] == pytest.approx(0.6) and segs[1]["confidence"] is None
    # ties in caption frequency go to the window with higher confidence
    caps = ["heavy rain falls now", "heavy rain falls down"] * 2  # Jaccard 0.6
    segs = tl.segments(_rows(caps, emb=[[1, 0]] * 4, conf=[0.1, 0.9, 0.1, 0.9],
                             hop=2.0), words=0.5).to_pylist()
    assert len(segs) == 1 and segs[0]["caption"] == "heavy rain falls down"


def test_sources_and_models_get_their_own_timelines_in_order():
    t = pa.concat_tables([_rows(["x", "x"], src="b.wav"), _rows(["y", "z"], src="a.wav")])
    t2 = _rows(["x", "x"], src="a.wav").set_column(1, "model_id", pa.array(["m2", "m2"]))
    segs = tl.segments(pa.concat_tables([t, t2]).take([3, 0, 5, 2, 1, 4])).to_pylist()
    assert [(s["source_uri"], s["model_id"], s["caption"]) for s in segs] == [
        ("a.wav", "m", "y"), ("a.wav", "m", "z"), ("a.wav", "m2", "x"), ("b.wav", "m", "x")]


def test_srt_and_vtt_parse_back_strictly():
    segs = [dict(start_s=0.0, end_s=2.5, caption="a dog\n\nbarks --> loudly", confidence=0.25),
            dict(start_s=2.5, end_s=3725.0004, caption="  ", confidence=None),
            dict(start_s=3725.0004, end_s=3725.0004, caption="rain", confidence=None)]
    srt = parse_srt(tl.to_srt(segs))
    assert [(c["start"], c["end"]) for c in srt] == [(0.0, 2.5), (2.5, 3725.0), (3725.0, 3725.001)]
    assert srt[0]["text"] == "a dog barks -> loudly" and srt[1]["text"] == "(no caption)"
    vtt = parse_vtt(tl.to_vtt(segs))
    assert [(c["start"], c["end"]) for c in vtt[:-1]] == [(c["start"], c["end"]) for c in srt]
    assert vtt[-1]["notes"] == ["NOTE confidence 0.250"]
    lines = [json.loads(x) for x in tl.to_jsonl(segs).splitlines()]
    assert [x["end_s"] for x in lines] == [2.5, 3725.0004, 3725.0004]


def test_file_names_follow_the_source_and_stay_unique():
    from jobs.timeline import file_names
    keys = [("s3://b/x/clip.mp4", "m"), ("s3://b/y/clip.mp4", "m"), ("/d/talk.en.wav", "m"),
            ("s3://b/shard.tar#a/b c.flac", "m"), ("/d/talk.en.wav", "m2")]
    names = file_names(keys, "srt")
    assert len(set(names.values())) == len(keys)
    assert names[("s3://b/shard.tar#a/b c.flac", "m")] == "b_c.srt"
    assert re.fullmatch(r"clip\.[0-9a-f]{8}\.srt", names[keys[0]])
    assert re.fullmatch(r"talk\.en\.[0-9a-f]{8}\.srt", names[keys[2]])


@pytest.fixture(scope="module")
def captioned(ray_local, tmp_path_factory):
    """A 20-s recording: two sound-world scenes with disjoint sources, back to back; captioned
    with 5-s windows every 2.5 s (overlapping) by the shipped sound-world model."""
    import soundfile as sf

    from jobs.caption import DEFAULT_MODEL, CaptionConfig, run
    from overheard.soundworld import SR, make_scene

    root = tmp_path_factory.mktemp("timeline")
    (root / "in").mkdir()
    a, _, ma = make_scene(11)
    names = {s["name"] for s in ma["sources"]}
    seed = next(s for s in range(12, 100)
                if not names & {x["name"] for x in make_scene(s)[2]["sources"]})
    b = make_scene(seed)[0]
    sf.write(str(root / "in" / "two_scenes.flac"), np.concatenate([a, b]), SR, subtype="PCM_16")
    out = root / "out"
    m = run(CaptionConfig(input=str(root / "in"), output=str(out), model=DEFAULT_MODEL,
                          progress=False, show=0, window=5.0, hop=2.5))
    assert m["windows"] == 7  # starts 0, 2.5, ..., 15
    return dict(root=root, out=str(out))


def test_command_writes_valid_timelines_of_a_real_run(captioned, s3_server, s3_bucket, capsys):
    from jobs.cli import main
    from jobs.sink import read_table_dir

    caps = read_table_dir(os.path.join(captioned["out"], "captions"))
    expect = tl.segments(caps).to_pylist()
    root = captioned["root"]
    for fmt in ("srt", "vtt", "jsonl"):
        assert main(["timeline", captioned["out"], str(root / fmt), "--format", fmt]) == 0
    assert "1 sources, 7 windows" in capsys.readouterr().out
    srt = parse_srt(open(root / "srt" / "two_scenes.srt").read())
    vtt = parse_vtt(open(root / "vtt" / "two_scenes.vtt").read())[:-1]
    jl = [json.loads(x) for x in open(root / "jsonl" / "timeline.jsonl")]
    assert len(srt) == len(vtt) == len(jl) == len(expect)
    # the segments tile the recording: 0 .. 20 s, each starting where the previous ended
    assert srt[0]["start"] == 0.0 and srt[-1]["end"] == 20.0
    assert all(x["end"] == y["start"] for x, y in zip(srt, srt[1:]))
    # overlapping windows: every inner boundary is a midpoint of an overlap (k * 2.5 + 1.25)
    assert all((c["start"] - 1.25) / 2.5 == round((c["start"] - 1.25) / 2.5) for c in srt[1:])
    by_window = dict(zip(caps.column("window_index").to_pylist(), caps.column("caption").to_pylist()))
    for c, v, j in zip(srt, vtt, jl):
        assert c["text"] == v["text"] == j["caption"]
        assert j["caption"] in {by_window[w] for w in range(j["first_window"], j["last_window"] + 1)}
        assert (c["start"], c["end"]) == (v["start"], v["end"]) == (j["start_s"], j["end_s"])
        assert j["source_uri"].endswith("two_scenes.flac")
    assert sum(j["windows"] for j in jl) == 7
    # the two scenes' sources differ, so the timeline has at least one boundary
    assert len(jl) >= 2
    idx = json.load(open(root / "srt" / "timeline.json"))
    assert idx["sources"][0]["file"] == "two_scenes.srt" and idx["sources"][0]["segments"] == len(srt)
    # to object storage: the same bytes
    assert main(["timeline", captioned["out"], f"s3://{s3_bucket}/tl", "--format", "srt"]) == 0
    fs = s3_server.fs()
    assert fs.cat(f"{s3_bucket}/tl/two_scenes.srt") == open(root / "srt" / "two_scenes.srt", "rb").read()
    with pytest.raises(SystemExit) as e:  # checked with the options: exit 2, one line
        main(["timeline", captioned["out"], str(root / "x"), "--format", "ass"])
    assert e.value.code == 2 and not (root / "x").exists()


def test_withheld_captions_do_not_break_the_timeline():
    """--min-confidence writes rows with caption null: they become "(no caption)" segments."""
    from overheard.timeline import segments, to_srt

    t = pa.table({"source_uri": ["a.wav"] * 3, "window_index": pa.array([0, 1, 2], pa.int32()),
                  "start_s": [0.0, 10.0, 20.0], "end_s": [10.0, 20.0, 30.0],
                  "caption": pa.array(["a dog barks", None, None], pa.string())})
    segs = segments(t)
    assert segs.column("caption").to_pylist() == ["a dog barks", ""]
    assert segs.column("start_s").to_pylist() == [0.0, 10.0]
    assert "(no caption)" in to_srt(segs.to_pylist())
