"""Observability of a caption run (issue 19): the run manifest is rewritten at every committed part,
``overheard status`` reads it (local and s3://), and the model pools' sizing rule."""

from __future__ import annotations

import json
import os
import threading
import time

import pyarrow.parquet as pq
import pytest

from tests import media_factory as mf


def test_pool_size_rule():
    from jobs.caption import CPUS_PER_CPU_ACTOR, pool_size

    # an explicit --captioner-actors caps the pool; the minimum never exceeds it
    assert pool_size(3, 1, 0, 0, 2) == (1, 3)
    assert pool_size(2, 5, 8, 1, 64) == (2, 2)
    # auto on GPUs: one actor per GPU share the cluster can offer (autoscaler limits included)
    assert pool_size(0, 1, 16, 1.0, 8) == (1, 16)
    assert pool_size(0, 1, 4, 0.5, 8) == (1, 8)
    # auto on CPUs: one per CPUS_PER_CPU_ACTOR CPUs, never fewer than one
    assert pool_size(0, 1, 0, 0, 2) == (1, 1)
    assert pool_size(0, 1, 0, 0, 3 * CPUS_PER_CPU_ACTOR) == (1, 3)
    assert pool_size(0, 2, 0, 0, 3 * CPUS_PER_CPU_ACTOR) == (2, 3)


def test_ray_progress_flag():
    from jobs.caption import CaptionConfig, ray_ui

    base = dict(input="i", output="o")
    env = os.environ.pop("RAY_ADDRESS", None)
    try:
        assert ray_ui(CaptionConfig(**base)) is False
        assert ray_ui(CaptionConfig(**base, ray_address="ray://h:10001")) is True
        assert ray_ui(CaptionConfig(**base, ray_progress="off", ray_address="x")) is False
        assert ray_ui(CaptionConfig(**base, ray_progress="on")) is True
        os.environ["RAY_ADDRESS"] = "http://127.0.0.1:8265"  # what `ray job submit` sets
        assert ray_ui(CaptionConfig(**base)) is True
        with pytest.raises(ValueError, match="--ray-progress"):
            ray_ui(CaptionConfig(**base, ray_progress="maybe"))
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        if env is not None:
            os.environ["RAY_ADDRESS"] = env


def _rows(path: str) -> int:
    return sum(pq.read_metadata(os.path.join(path, f)).num_rows
               for f in os.listdir(path) if f.endswith(".parquet")) if os.path.isdir(path) else 0


def test_manifest_rewritten_at_each_commit(ray_local, tiny_model, tmp_path, capsys):
    """A run polled from outside while it goes: the manifest says ``running`` with counts that
    grow, and at every rewrite its window count equals the rows committed in caption parts."""
    from jobs.caption import CaptionConfig, run
    from jobs.status import main as status_main

    media = tmp_path / "media"
    media.mkdir()
    for i in range(6):
        mf.make_tone(str(media / f"t{i}.wav"), seconds=12.0 + i, sr=16000, channels=1,
                     freq=300 + 40 * i)
    out = tmp_path / "out"
    cfg = CaptionConfig(input=str(media), output=str(out), model=tiny_model, progress=False,
                        show=0, flush_interval=0.0, run_id="live", pack_sources=False,
                        captioner_batch=2, encoder_batch=2)  # outputs spread over time
    result = {}
    th = threading.Thread(target=lambda: result.update(m=run(cfg)))
    th.start()
    mpath = out / "runs" / "live" / "manifest.json"
    snaps = []
    while th.is_alive():
        try:
            raw = mpath.read_bytes()
        except OSError:
            raw = b""
        if raw:
            m = json.loads(raw)  # atomic rewrite: never a partial file
            if m["status"] == "running" and (not snaps or m["updated_at"] != snaps[-1][0]["updated_at"]):
                snaps.append((m, _rows(str(out / "captions"))))
        time.sleep(0.01)
    th.join()
    final = result["m"]
    assert final["status"] == "completed" and final["windows"] == 12  # 6 files x 2 windows
    running = [s for s in snaps if s[0]["windows"] > 0]
    # flush_interval 0: a part per released source, the manifest republished after each
    assert len(running) >= 2, [s[0]["windows"] for s in snaps]
    assert [m["windows"] for m, _ in running] == sorted(m["windows"] for m, _ in running)
    for m, rows in running:
        # rows may run ahead of a snapshot (a later part landed before the poll), never behind
        assert rows >= m["windows"] and m["parts"] >= 1  # a count; the files: OUTPUT/_commits
        assert m["sources_todo"] == 6 and "updated_at" in m
    assert any("eta_s" in m for m, _ in running)
    on_disk = json.loads(mpath.read_bytes())
    assert on_disk["status"] == "completed" and "eta_s" not in on_disk
    assert on_disk["windows"] == _rows(str(out / "captions")) == 12

    assert status_main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "run live: completed" in text and "6/6 done" in text and "12 (" in text
    assert status_main([str(tmp_path / "nothing-here")]) == 1


def test_status_reads_s3_and_flags_a_dead_run(s3_server, capsys):
    """A manifest on s3:// whose driver stopped rewriting it long ago reads as ``running?``."""
    from jobs.status import main as status_main

    fs = s3_server.fs()
    bucket = "overheard-status"  # its own bucket: other tests count every key of the shared one
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    old = time.time() - 3600
    m = dict(run_id="r1", status="running", started_at=old, updated_at=old, input="in",
             output="out", sources_todo=10, sources_captioned=3, sources_failed=1, windows=7,
             audio_hours=0.02, windows_per_s=1.5, wall_s=60, failures_by_type={"corrupt": 1},
             parts=["p1"], sources_listed=10, sources_skipped_done=0, eta_s=120)
    fs.pipe(f"{bucket}/status-test/runs/r1/manifest.json", json.dumps(m).encode())
    assert status_main([f"s3://{bucket}/status-test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == "r1"
    assert status_main([f"s3://{bucket}/status-test"]) == 0
    text = capsys.readouterr().out
    assert "running?" in text and "4/10 done" in text and "{'corrupt': 1}" in text
