"""The caption job against a real S3-compatible server on 127.0.0.1: input archive, model
directory and output all in a bucket, read through s3fs with signed requests."""

from __future__ import annotations

import json
import os

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests import media_factory as mf


def test_s3_input_model_and_output(ray_local, s3_server, s3_bucket, tiny_model, tmp_path,
                                   capfd):
    fs = s3_server.fs()
    local = tmp_path / "media"
    local.mkdir()
    mf.make_tone(str(local / "a.wav"), seconds=21.0, sr=48000, channels=1, freq=500)
    mf.make_speech(str(local / "b.ogg"), "rain falls on a tin roof")
    mf.make_video(str(local / "c.mp4"), seconds=3.0, with_audio=True)
    (local / "broken.mp3").write_bytes(b"\x00" * 1000)
    fs.put(str(local) + "/", f"{s3_bucket}/archive/", recursive=True)
    fs.put(tiny_model + "/", f"{s3_bucket}/models/v1/", recursive=True)
    assert len(fs.ls(f"{s3_bucket}/archive/")) == 4

    from jobs.caption import main
    rc = main([f"s3://{s3_bucket}/archive/", f"s3://{s3_bucket}/captions/",
               "--model", f"s3://{s3_bucket}/models/v1", "--no-progress", "--show", "3"])
    assert rc == 0
    parts = [p for p in fs.find(f"{s3_bucket}/captions/captions/") if p.endswith(".parquet")]
    assert parts
    t = pq.read_table(parts[0], filesystem=fs)
    uris = set(t["source_uri"].to_pylist())
    assert uris == {f"s3://{s3_bucket}/archive/{n}" for n in ("a.wav", "b.ogg", "c.mp4")}
    a = t.filter(pc.equal(t["source_uri"], f"s3://{s3_bucket}/archive/a.wav"))
    assert a.num_rows == 3 and a["end_s"].to_pylist()[-1] == pytest.approx(21.0, abs=0.01)
    # S3 objects carry their ETag as the source version
    assert all(v and ":" not in v for v in t["source_version"].to_pylist())
    fparts = [p for p in fs.find(f"{s3_bucket}/captions/failures/") if p.endswith(".parquet")]
    f = pq.read_table(fparts[0], filesystem=fs).to_pylist()
    assert [r["source_uri"] for r in f] == [f"s3://{s3_bucket}/archive/broken.mp3"]
    assert f[0]["error_type"] in ("corrupt", "empty_file") and not f[0]["retryable"]
    runs = fs.ls(f"{s3_bucket}/captions/runs/")
    man = json.loads(fs.cat(runs[0] + "/manifest.json"))
    assert man["windows"] == t.num_rows and man["status"] == "completed"
    # the secret key never lands in anything the job wrote or printed (driver and the
    # worker logs Ray forwards to it)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    printed = capfd.readouterr()
    assert "captioned" in printed.out
    assert secret not in printed.out and secret not in printed.err
    for p in fs.find(f"{s3_bucket}/captions/"):
        assert secret.encode() not in fs.cat(p)


def test_missing_bucket_fails_at_start(tiny_model, s3_server, tmp_path):
    from jobs.caption import CaptionConfig, run
    with pytest.raises(FileNotFoundError, match="input not found"):
        run(CaptionConfig(input="s3://no-such-bucket-overheard/x/", output=str(tmp_path / "o"),
                          model=tiny_model))
