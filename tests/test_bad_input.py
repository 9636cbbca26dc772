"""The bad-input corpus of issue 8 through the whole caption job: each input ends as caption
rows or a clear failure row, the job never hangs or crashes, and no output escapes OUTPUT."""

from __future__ import annotations

import os
import subprocess
import wave

import numpy as np
import pyarrow.compute as pc
import pytest

from tests import media_factory as mf
from tests.test_caption_job import read_dir


def _write_wav(path, samples: np.ndarray, sr: int):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((samples * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    expected = {name: etype for name, etype in mf.make_bad_inputs(str(d)).items()}
    # an mp3 named .wav: decoders sniff content, the extension is only a hint
    mf.make_speech(str(d / "_speech.mp3"), "the wrong extension")
    os.rename(d / "_speech.mp3", d / "really_mp3.wav")
    expected["really_mp3.wav"] = None
    # a wav header with no samples
    _write_wav(d / "header_only.wav", np.zeros(0, dtype=np.float32), 16000)
    expected["header_only.wav"] = "no_audio_samples"
    # digital silence: log-mel of zeros must stay finite (no NaN caption or embedding)
    _write_wav(d / "silence.wav", np.zeros(16000 * 12, dtype=np.float32), 16000)
    expected["silence.wav"] = None
    # a 1-second file
    mf.make_tone(str(d / "one_second.wav"), seconds=1.0, sr=22050, channels=1, freq=700)
    expected["one_second.wav"] = None
    # a 3-hour file (8 kHz 8-bit: 86 MB, written in ~3 s) against --max-duration 3600
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "sine=f=200:r=8000", "-t", "10800", "-c:a", "pcm_u8",
                    str(d / "three_hours.wav")], check=True)
    expected["three_hours.wav"] = "too_long"
    # a name with spaces, quotes and unicode
    mf.make_tone(str(d / "it's a \"test\" – 日本語.wav"), seconds=2.0, sr=16000, channels=1,
                 freq=300)
    expected["it's a \"test\" – 日本語.wav"] = None
    return d, expected


def test_bad_input_corpus_through_the_job(ray_local, tiny_model, corpus, tmp_path):
    from jobs.caption import CaptionConfig, run
    d, expected = corpus
    out = tmp_path / "out"
    m = run(CaptionConfig(input=str(d), output=str(out), model=tiny_model, progress=False,
                          show=0, max_duration=3600.0))
    assert m["status"] == "completed"
    caps = read_dir(str(out / "captions"))
    fails = {r["source_uri"]: r for r in read_dir(str(out / "failures")).to_pylist()}
    for name, etype in expected.items():
        uri = str(d / name)
        n = caps.filter(pc.equal(caps["source_uri"], uri)).num_rows
        if etype is None:
            assert n >= 1 and uri not in fails, (name, fails.get(uri))
        else:
            assert uri in fails, name
            assert fails[uri]["error_type"] == etype, (name, fails[uri]["message"])
            assert len(fails[uri]["message"]) > 10
            if etype != "truncated":
                assert n == 0, name
    emb = np.asarray(caps["audio_embedding"].to_pylist(), dtype=np.float32)
    assert np.isfinite(emb).all()
    assert all(c.strip() for c in caps["caption"].to_pylist())
    # every listed source is accounted for exactly once in the manifest
    assert m["sources_todo"] == len(expected)
    assert sorted(os.listdir(out)) == ["_commits", "captions", "failures", "runs"]


def test_decode_timeout_is_a_retryable_failure(ray_local, tiny_model, tmp_path):
    from jobs.caption import CaptionConfig, run
    mf.make_tone(str(tmp_path / "slow.flac"), seconds=60.0, sr=48000, channels=2, freq=440)
    out = tmp_path / "out"
    m = run(CaptionConfig(input=str(tmp_path / "slow.flac"), output=str(out), model=tiny_model,
                          progress=False, show=0, decode_timeout=1e-6))
    fails = read_dir(str(out / "failures")).to_pylist()
    assert [f["error_type"] for f in fails] == ["timeout"] and fails[0]["retryable"]
    assert m["sources_failed"] == 1
    # retryable: the next run (with a sane limit) captions it
    m2 = run(CaptionConfig(input=str(tmp_path / "slow.flac"), output=str(out), model=tiny_model,
                           progress=False, show=0))
    assert m2["sources_todo"] == 1 and m2["windows"] == 6


def test_path_traversal_keys_stay_inside_the_destination(ray_local, s3_server, s3_bucket,
                                                         tiny_model, tmp_path):
    import boto3
    mf.make_tone(str(tmp_path / "x.wav"), seconds=2.0, sr=16000, channels=1, freq=440)
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    body = (tmp_path / "x.wav").read_bytes()
    s3.put_object(Bucket=s3_bucket, Key="trav/ok.wav", Body=body)
    s3.put_object(Bucket=s3_bucket, Key="trav/../../escape.wav", Body=body)
    from jobs.caption import CaptionConfig, run
    m = run(CaptionConfig(input=f"s3://{s3_bucket}/trav/", output=f"s3://{s3_bucket}/travout/",
                          model=tiny_model, progress=False, show=0))
    assert m["status"] == "completed" and m["sources_todo"] >= 1
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    written = [k for k in keys if not k.startswith(("trav/", "outage/", "archive/", "models/",
                                                    "captions/", "creds/"))]
    assert written and all(k.startswith("travout/") for k in written), written
