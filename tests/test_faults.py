"""Fault injection against the caption job on real parts: a killed actor process, an object
store outage mid-run, files that change while read, readers racing the writer, wrong
credentials. Invariant after each: exactly one row per window, failures recorded."""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from tests import media_factory as mf
from tests.test_caption_job import expected_windows, read_dir


def _pids_matching(text: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(d))
        except OSError:
            pass
    return pids


def _archive(d, n, base=14.0):
    d.mkdir(parents=True, exist_ok=True)
    durations = {}
    for i in range(n):
        secs = base + i
        p = d / f"s{i:02d}.wav"
        mf.make_tone(str(p), seconds=secs, sr=16000, channels=1, freq=250 + 40 * i)
        durations[str(p)] = secs
    return durations


def _assert_exact(out, durations):
    caps = read_dir(os.path.join(out, "captions"))
    keys = list(zip(caps["source_uri"].to_pylist(), caps["window_index"].to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate rows"
    for uri, secs in durations.items():
        got = sorted(i for u, i in keys if u == uri)
        assert got == list(range(expected_windows(secs))), uri
    return caps


def _run_in_thread(cfg):
    from jobs.caption import run
    box = {}

    def target():
        try:
            box["manifest"] = run(cfg)
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def test_actor_process_killed_mid_run(ray_local, tiny_model, tmp_path):
    from jobs.caption import CaptionConfig
    durations = _archive(tmp_path / "a", 20)
    out = str(tmp_path / "out")
    # batch-1 model calls keep the CLAP actor busy long after the first part lands, even idle
    cfg = CaptionConfig(input=str(tmp_path / "a"), output=out, model=tiny_model,
                        progress=False, flush_interval=0, show=0, encoder_batch=1,
                        captioner_batch=1)
    t, box = _run_in_thread(cfg)
    killed = []
    deadline = time.time() + 300
    while time.time() < deadline and not killed and t.is_alive():
        caps_dir = os.path.join(out, "captions")
        if os.path.isdir(caps_dir) and os.listdir(caps_dir):
            # the CLAP actor: ClapCaptioner (fused, the default) or ClapEmbedder (two pools)
            for pid in _pids_matching("MapWorker(MapBatches(Clap"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.1)
    t.join(600)
    assert killed, "no CLAP actor process found to kill before the job ended"
    assert "error" not in box, box.get("error")
    m = box["manifest"]
    caps = _assert_exact(out, durations)
    assert m["windows"] == caps.num_rows and m["status"] == "completed"


def test_object_store_outage_mid_run(ray_local, s3_server, s3_bucket, tiny_model, tmp_path):
    """The store resets every connection from the moment the job has listed its input until
    reads have failed (or 60 s), then comes back. Sources it broke are retryable failures
    recorded as such; the job neither hangs nor crashes; the rerun completes them exactly
    once."""
    from jobs.caption import CaptionConfig, run
    fs = s3_server.fs()
    local = tmp_path / "a"
    durations_local = _archive(local, 10, base=30.0)
    fs.put(str(local) + "/", f"{s3_bucket}/outage/", recursive=True)
    durations = {f"s3://{s3_bucket}/outage/{os.path.basename(k)}": v
                 for k, v in durations_local.items()}
    out = str(tmp_path / "out")
    cfg = CaptionConfig(input=f"s3://{s3_bucket}/outage/", output=out, model=tiny_model,
                        progress=False, flush_interval=0, show=0)
    t, box = _run_in_thread(cfg)
    deadline = time.time() + 300
    # the run's first manifest is published once its input is listed and planned
    while time.time() < deadline and t.is_alive() and not glob.glob(
            os.path.join(out, "runs", "*", "manifest.json")):
        time.sleep(0.05)
    s3_server.outage()  # listing done, manifest written: every read from now on fails
    deadline = time.time() + 60
    while time.time() < deadline and t.is_alive() and not os.path.isdir(
            os.path.join(out, "failures")):
        time.sleep(0.1)
    s3_server.restore()
    t.join(600)
    assert not t.is_alive(), "job hung after the outage"
    assert "error" not in box, box.get("error")
    m1 = box["manifest"]
    caps_dir = os.path.join(out, "captions")
    first_rows = read_dir(caps_dir).num_rows if os.path.isdir(caps_dir) else 0
    assert m1["windows"] == first_rows
    assert m1["sources_failed"] >= 1, "the outage broke no read; the test proves nothing"
    fails = read_dir(os.path.join(out, "failures")).to_pylist()
    assert len(fails) == m1["sources_failed"]
    assert all(f["error_type"] == "read_error" and f["retryable"] for f in fails), fails
    m2 = run(CaptionConfig(input=cfg.input, output=out, model=tiny_model, progress=False, show=0))
    assert m2["sources_todo"] == m1["sources_failed"]
    _assert_exact(out, durations)


def test_source_changed_while_read_is_retried(tmp_path):
    from actors.windows import source_windows
    from overheard import storage
    p = tmp_path / "x.wav"
    mf.make_tone(str(p), seconds=35.0, sr=16000, channels=1, freq=440)
    [(uri, _, version)] = list(storage.list_files(str(tmp_path)))
    gen = source_windows(uri, version, window_s=10.0, hop_s=None, min_window_s=0.5,
                         pad_mode="repeatpad", max_duration_s=None, timeout_s=None)
    rows = [next(gen)]
    time.sleep(0.01)
    mf.make_tone(str(p), seconds=12.0, sr=16000, channels=1, freq=880)  # rewritten mid-read
    rows += list(gen)
    assert rows[-1]["error_type"] == "changed" and rows[-1]["windows_kept"] == len(rows) - 1
    from actors.part_writer import release
    from actors.windows import _table
    rel = release(_table(rows))
    assert rel.sources == 1 and rel.captions is None  # nothing of the mixed read is kept
    [fail] = rel.failures.to_pylist()
    assert fail["retryable"] and fail["windows_kept"] == 0 and "discarded" in fail["message"]


def test_writer_killed_mid_part(ray_local, tiny_model, tmp_path, monkeypatch):
    """A part writer dies (os._exit, as a killed worker) after writing its captions file and
    before its failures file and its report. Ray reruns the task, which rewrites the same part
    names; the output is exact, every part is committed once, and nothing else is left."""
    from actors.part_writer import EXIT_HOOK
    from jobs.caption import CaptionConfig, run
    from jobs.sink import committed_files
    durations = _archive(tmp_path / "a", 4)
    (tmp_path / "a" / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")  # a failure row
    hook = tmp_path / "writer-died"
    monkeypatch.setenv(EXIT_HOOK, str(hook))
    out = str(tmp_path / "out")
    m = run(CaptionConfig(input=str(tmp_path / "a"), output=out, model=tiny_model,
                          progress=False, flush_interval=0, show=0))
    assert hook.exists(), "no writer reached the fault"
    caps = _assert_exact(out, durations)
    assert m["status"] == "completed" and m["windows"] == caps.num_rows
    fails = read_dir(os.path.join(out, "failures")).to_pylist()
    assert [f["source_uri"].rsplit("/", 1)[-1] for f in fails] == ["broken.wav"]
    assert m["sources_failed"] == 1 and m["sources_captioned"] == len(durations)
    listed = sorted(committed_files(out))
    on_disk = sorted(f"{d}/{n}" for d in ("captions", "failures")
                     for n in os.listdir(os.path.join(out, d)))
    assert listed == on_disk and len(set(listed)) == len(listed)


def test_readers_never_see_partial_parts(ray_local, tiny_model, tmp_path):
    from jobs.caption import CaptionConfig
    durations = _archive(tmp_path / "a", 8)
    out = str(tmp_path / "out")
    # batches of 2 windows: parts land one after another while the job runs (with one 64-window
    # batch every source is released at once and the only part is written as the job ends)
    cfg = CaptionConfig(input=str(tmp_path / "a"), output=out, model=tiny_model,
                        progress=False, flush_interval=0, show=0, captioner_batch=2,
                        encoder_batch=2)
    t, box = _run_in_thread(cfg)
    seen, errors = set(), []
    while t.is_alive():
        for sub in ("captions", "failures"):
            d = os.path.join(out, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name.startswith(".") or name in seen:
                    continue
                try:
                    pq.read_table(os.path.join(d, name))
                    seen.add(name)
                except Exception as e:  # a half-written file would land here
                    errors.append((name, repr(e)))
        time.sleep(0.02)
    assert "error" not in box, box.get("error")
    assert not errors, errors
    assert seen
    _assert_exact(out, durations)
    leftovers = [n for n in os.listdir(os.path.join(out, "captions")) if n.startswith(".")]
    assert not leftovers


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from overheard import storage
    target = tmp_path / "p" / "part.parquet"

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(str(target), b"x" * 1000)
    assert not target.exists()
    assert os.listdir(tmp_path / "p") == []


@pytest.fixture(scope="module")
def authed_s3():
    """A second S3 server that enforces credentials (moto IAM): the first 3 requests create a
    user with an admin policy and its key; every request after must be signed with it."""
    import boto3
    from tests.s3server import S3Server, _free_port
    srv = S3Server(_free_port(), env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}).start()
    iam = boto3.client("iam", endpoint_url=srv.endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="overheard")
    key = iam.create_access_key(UserName="overheard")["AccessKey"]
    iam.put_user_policy(UserName="overheard", PolicyName="s3-all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    yield srv, key["AccessKeyId"], key["SecretAccessKey"]
    srv.stop()


def test_wrong_credentials_fail_at_start_without_leaking(authed_s3, tiny_model, tmp_path,
                                                         monkeypatch):
    from jobs.caption import CaptionConfig, run
    srv, key_id, secret = authed_s3
    good = srv.fs(key=key_id, secret=secret)
    good.mkdir("creds")
    mf.make_tone(str(tmp_path / "a.wav"), seconds=3.0, sr=16000, channels=1, freq=440)
    good.put(str(tmp_path / "a.wav"), "creds/in/a.wav")
    monkeypatch.setenv("S3_ENDPOINT_URL", srv.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    wrong_secret = "wrong-secret-" + secret[:4] + "-must-not-leak"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    out = tmp_path / "out"
    with pytest.raises(PermissionError) as ei:
        run(CaptionConfig(input="s3://creds/in/", output=str(out), model=tiny_model))
    msg = str(ei.value)
    assert "cannot list the input at s3://creds/in/" in msg and "credentials" in msg
    assert wrong_secret not in msg and secret not in msg
    assert not out.exists(), "work started despite wrong credentials"
    # an unknown key id, on a fresh client (s3fs caches clients per endpoint)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with pytest.raises(PermissionError, match="cannot list the input"):
        run(CaptionConfig(input="s3://creds/in/", output="s3://creds/out/", model=tiny_model))
    s3fs.S3FileSystem.clear_instance_cache()
    # and with the right key, the same job runs
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    from jobs.sources import list_sources
    assert list_sources("s3://creds/in/")["source_uri"].to_pylist() == ["s3://creds/in/a.wav"]
