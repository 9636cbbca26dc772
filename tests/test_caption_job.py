"""The caption job end to end on real parts: local Ray, real media made by ffmpeg/sox/espeak-ng,
tiny random-weight CLAP + decoder in their real formats, Parquet read back with pyarrow."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests import media_factory as mf
from overheard.schema import SCHEMA_VERSION, caption_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_windows(duration: float, window: float = 10.0, min_window: float = 0.5) -> int:
    n, k = 0, 0
    while k * window < duration - 1e-9:
        if duration - k * window >= min_window or k == 0:
            n += 1
        k += 1
    return n


def read_dir(path: str) -> pa.Table:
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A small archive: exact-length wav/flac (countable windows), speech mp3, mp4 video,
    plus every bad input of the media factory."""
    d = tmp_path_factory.mktemp("archive")
    mf.make_tone(str(d / "tone 25s.wav"), seconds=25.0, sr=44100, channels=2, freq=440)
    mf.make_tone(str(d / "long_95s.flac"), seconds=95.0, sr=16000, channels=1, freq=880)
    mf.make_tone(str(d / "short_0.3s.wav"), seconds=0.3, sr=48000, channels=1, freq=1000)
    mf.make_speech(str(d / "speech.mp3"), "a man says hello while a bell rings")
    mf.make_video(str(d / "clip.mp4"), seconds=4.0, with_audio=True)
    bad = mf.make_bad_inputs(str(d / "bad"))
    exact = {"tone 25s.wav": 25.0, "long_95s.flac": 95.0, "short_0.3s.wav": 0.3}
    return d, exact, bad


def run_job(args, **kw):
    from jobs.caption import CaptionConfig, run
    cfg = CaptionConfig(**dict(args, **kw))
    return run(cfg)


def test_local_archive_end_to_end(ray_local, tiny_model, archive, tmp_path):
    d, exact, bad = archive
    out = str(tmp_path / "out")
    m = run_job(dict(input=str(d), output=out, model=tiny_model, progress=False))
    caps = read_dir(os.path.join(out, "captions"))
    dim = caps.schema.field("audio_embedding").type.list_size
    assert caps.schema.equals(caption_schema(dim), check_metadata=False)
    assert caps.schema.metadata[b"overheard_schema_version"] == SCHEMA_VERSION.encode()
    # one row per window, windows of exact-length files counted by hand
    for name, dur in exact.items():
        rows = caps.filter(pc.equal(caps["source_uri"], str(d / name)))
        assert rows.num_rows == expected_windows(dur), name
        assert rows["window_index"].to_pylist() == list(range(rows.num_rows))
        starts = rows["start_s"].to_pylist()
        ends = rows["end_s"].to_pylist()
        assert starts == [10.0 * i for i in range(rows.num_rows)]
        assert ends[-1] == pytest.approx(dur, abs=0.01)
    for name in ("speech.mp3", "clip.mp4"):
        assert caps.filter(pc.equal(caps["source_uri"], str(d / name))).num_rows >= 1
    # no duplicates, captions present, embeddings unit length
    keys = set(zip(caps["source_uri"].to_pylist(), caps["window_index"].to_pylist()))
    assert len(keys) == caps.num_rows
    assert all(isinstance(c, str) and c.strip() for c in caps["caption"].to_pylist())
    emb = np.asarray(caps["audio_embedding"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert set(caps["run_id"].to_pylist()) == {m["run_id"]}
    assert len(set(caps["model_id"].to_pylist())) == 1
    # each bad input is a failure row with its expected type, or captioned if it is valid
    fails = read_dir(os.path.join(out, "failures"))
    by_uri = {r["source_uri"]: r for r in fails.to_pylist()}
    for name, etype in bad.items():
        uri = str(d / "bad" / name)
        if etype is None:
            assert caps.filter(pc.equal(caps["source_uri"], uri)).num_rows >= 1, name
        else:
            assert uri in by_uri, f"{name} has no failure row"
            assert by_uri[uri]["error_type"] == etype, (name, by_uri[uri])
            assert by_uri[uri]["message"]
    # manifest agrees with the tables
    man = json.load(open(os.path.join(out, "runs", m["run_id"], "manifest.json")))
    assert man["status"] == "completed"
    assert man["windows"] == caps.num_rows
    n_sources = len(set(caps["source_uri"].to_pylist()) | set(by_uri))
    assert man["sources_captioned"] + man["sources_failed"] - sum(
        1 for u in by_uri if caps.filter(pc.equal(caps["source_uri"], u)).num_rows) == n_sources
    assert 0 < man["first_output_s"] <= man["wall_s"]  # start-up (README "Performance")
    cfg = json.load(open(os.path.join(out, "runs", m["run_id"], "config.json")))
    # saved by group (jobs/caption_config.py)
    assert cfg["inputs"]["input"] == str(d) and cfg["windows"]["window"] == 10.0
    assert cfg["resources"]["pack_sources"] is True

    # rerun: everything is done, nothing new is written
    m2 = run_job(dict(input=str(d), output=out, model=tiny_model, progress=False))
    assert m2["sources_todo"] == 0 and m2["windows"] == 0
    assert read_dir(os.path.join(out, "captions")).num_rows == caps.num_rows
    assert m2["settings_differ"] == {}
    # a rerun with settings that change rows still skips what is done, and says so
    m3 = run_job(dict(input=str(d), output=out, model=tiny_model, progress=False, window=5.0,
                      min_confidence=0.3))
    assert m3["sources_todo"] == 0
    assert m3["settings_differ"] == {"window": [10.0, 5.0], "min_confidence": [0.0, 0.3]}


def test_deterministic_across_runs(ray_local, tiny_model, archive, tmp_path):
    """The same input and model give the same captions and embeddings, whether CLAP and the
    decoder share one actor (the default) or run in two pools."""
    d, _, _ = archive
    tables = []
    for i in range(2):
        out = str(tmp_path / f"out{i}")
        run_job(dict(input=str(d / "tone 25s.wav"), output=out, model=tiny_model,
                     progress=False, fuse_models=(i == 0)))
        t = read_dir(os.path.join(out, "captions")).sort_by("window_index")
        tables.append(t)
    assert tables[0]["caption"].to_pylist() == tables[1]["caption"].to_pylist()
    assert tables[0]["audio_embedding"].to_pylist() == tables[1]["audio_embedding"].to_pylist()


def test_manifest_csv_input_and_limit(ray_local, tiny_model, archive, tmp_path):
    d, _, _ = archive
    man = tmp_path / "list.csv"
    man.write_text(f"uri\n{d / 'tone 25s.wav'}\n{d / 'speech.mp3'}\n{d / 'clip.mp4'}\n")
    out = str(tmp_path / "out")
    m = run_job(dict(input=str(man), output=out, model=tiny_model, progress=False, limit=2))
    assert m["sources_listed"] == 3 and m["sources_todo"] == 2
    # the summary and `overheard status` say what the limit left (a new user saw no hint)
    from jobs.caption import summary_text
    from jobs.status import format_status
    left = "--limit 2 reached: 1 more listed source left for a later run"
    assert left in summary_text(m) and left in format_status(m)
    m2 = run_job(dict(input=str(man), output=out, model=tiny_model, progress=False))
    assert m2["sources_skipped_done"] == 2 and m2["sources_todo"] == 1
    assert "--limit" not in summary_text(m2)
    caps = read_dir(os.path.join(out, "captions"))
    assert len(set(caps["source_uri"].to_pylist())) == 3


def _todo_blocks(plan) -> dict:
    """{block: sorted URIs} of a packed todo list."""
    out: dict = {}
    for t in plan.tables():
        for u, b in zip(t["source_uri"].to_pylist(), t["block"].to_pylist()):
            out.setdefault(b, []).append(u)
    return {b: sorted(u) for b, u in out.items()}


def test_todo_in_several_packed_parts(ray_local, tiny_model, tmp_path, monkeypatch):
    """A todo list spilled (and packed) in several parts, TODO_PART_ROWS forced to 4: every
    source is captioned exactly once, block numbers run on across parts, and each part written
    holds exactly the sources of one todo block (blocks arrive whole at the part writer)."""
    import re

    from jobs import sources as S

    monkeypatch.setattr(S, "TODO_PART_ROWS", 4)
    d = tmp_path / "clips"
    d.mkdir()
    uris = []
    for i in range(11):
        uris.append(str(mf.make_tone(str(d / f"c{i:02d}.wav"), seconds=1.0 + 0.25 * i,
                                     sr=16000, freq=300 + 40 * i)))
    # sizes for 8 (packed by size), none for 3 (unknown: unknown_size_sources=2 to a block)
    sizes = [os.path.getsize(u) if i < 8 else 0 for i, u in enumerate(uris)]
    man = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"uri": uris, "size": sizes}), man)
    out = str(tmp_path / "out")
    m = run_job(dict(input=man, output=out, model=tiny_model, progress=False,
                     unknown_size_sources=2))
    assert m["status"] == "completed" and m["sources_captioned"] == 11
    caps = read_dir(os.path.join(out, "captions"))
    assert sorted(caps["source_uri"].to_pylist()) == sorted(uris)  # one 10-s window each
    want = _todo_blocks(S.plan_sources(S.open_listing(man), str(tmp_path / "empty"),
                                       str(tmp_path / "todo"),
                                       packing=dict(pack=True, unknown_sources=2)))
    assert sorted(want) == [0, 1, 2, 3]  # c00-03 | c04-07 | c08 c09 | c10
    got = {}
    for f in os.listdir(os.path.join(out, "captions")):
        b = int(re.search(r"-b(\d{6,})-", f).group(1))
        got[b] = sorted(pq.read_table(os.path.join(out, "captions", f))["source_uri"].to_pylist())
    assert got == want


def test_decode_calls_get_one_whole_block(ray_local, tmp_path, monkeypatch):
    """The decode stage's input (jobs.pipeline.decode_input: packed todo parts read by Ray
    tasks, cut into one-row blocks) gives each decode call exactly one decode block, whole,
    from spilled parts and from an in-memory table alike."""
    from jobs import sources as S
    from jobs.caption import CaptionConfig
    from jobs.pipeline import decode_input, packing
    from jobs.pools import placement

    monkeypatch.setattr(S, "TODO_PART_ROWS", 60)
    rng = np.random.default_rng(5)
    n = 300
    man = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"uri": [f"{tmp_path}/x/f{i:04d}.wav" for i in range(n)],
                             "size": rng.integers(-1, 3 << 20, n)}), man)
    cfg = CaptionConfig(input=man, output=str(tmp_path / "out"), unknown_size_sources=3)
    placement(cfg, ray_local, "")  # the job's Ray Data context (no block shaping)
    plan = S.plan_sources(S.open_listing(man), cfg.output, str(tmp_path / "todo"),
                          packing=packing(cfg))
    want = _todo_blocks(plan)
    assert len(plan.parts) == 5 and len(want) > 20

    def record_call(batch: pa.Table) -> pa.Table:  # one row per call: its blocks and sources
        from jobs.blocks import unpack_blocks

        tables = list(unpack_blocks(batch))
        return pa.table({"blocks": [sorted({t["block"][0].as_py() for t in tables})],
                         "uris": [sorted(u for t in tables for u in t["source_uri"].to_pylist())]})

    for sources in (plan.parts, S.list_sources(man)):
        calls = decode_input(cfg, sources).map_batches(
            record_call, batch_size=None, batch_format="pyarrow", num_cpus=0.5,
            memory=0).take_all()
        assert all(len(c["blocks"]) == 1 for c in calls)
        got = {c["blocks"][0]: c["uris"] for c in calls}
        assert len(got) == len(calls)  # a block in one call only
        if sources is plan.parts:
            assert got == want
        else:  # packed in one piece: the same sources, fewer (fuller) blocks
            assert sorted(u for v in got.values() for u in v) == sorted(
                u for v in want.values() for u in v)


def test_missing_input_fails_before_work(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        run_job(dict(input=str(tmp_path / "nope"), output=str(tmp_path / "o"), model=tiny_model))
    with pytest.raises(FileNotFoundError, match="CLAP model not found"):
        run_job(dict(input=str(tmp_path), output=str(tmp_path / "o"), model=str(tmp_path)))
    half = tmp_path / "half-model"
    shutil.copytree(os.path.join(tiny_model, "clap"), half / "clap")
    with pytest.raises(FileNotFoundError, match="decoder not found"):
        run_job(dict(input=str(tmp_path), output=str(tmp_path / "o"), model=str(half)))
    assert not os.path.exists(tmp_path / "o")


def test_killed_run_restarts_with_exactly_one_row_per_window(ray_local, tiny_model, tmp_path):
    """SIGKILL the job's driver (as a preempted head or a cancelled `ray job submit` would)
    after its first part lands; the rerun must end with every window exactly once."""
    d = tmp_path / "many"
    d.mkdir()
    durations = {}
    # 24 sources and batch-1 model calls: long enough that, even on an idle machine, the job is
    # still running when its first part lands (12 sources with default batches finished first)
    for i in range(24):
        secs = 12.0 + i % 12
        mf.make_tone(str(d / f"t{i:02d}.wav"), seconds=secs, sr=16000, channels=1,
                     freq=300 + 50 * i)
        durations[str(d / f"t{i:02d}.wav")] = secs
    out = tmp_path / "out"
    env = dict(os.environ)
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "jobs.caption", str(d), str(out), "--model", tiny_model,
           "--flush-interval", "0", "--no-progress", "--show", "0", "--ray-address", address,
           "--encoder-batch", "1", "--captioner-batch", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caps_dir = out / "captions"
    deadline = time.time() + 240
    while time.time() < deadline:
        if caps_dir.exists() and any(f.endswith(".parquet") for f in os.listdir(caps_dir)):
            break
        if p.poll() is not None:
            break
        time.sleep(0.2)
    killed = p.poll() is None
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert killed, "job finished before it could be killed; make the archive larger"
    first = read_dir(str(caps_dir))
    assert 0 < len(set(first["source_uri"].to_pylist())) < len(durations)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    caps = read_dir(str(caps_dir))
    keys = list(zip(caps["source_uri"].to_pylist(), caps["window_index"].to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate rows after restart"
    want = sum(expected_windows(s) for s in durations.values())
    assert len(keys) == want
    for uri, secs in durations.items():
        assert sum(1 for u, _ in keys if u == uri) == expected_windows(secs)


def test_untrusted_or_broken_model_is_refused_before_work(tiny_model, archive, tmp_path):
    """A pickle posing as safetensors, or weights whose shapes do not match the config, stop
    the job at start with a clear message; nothing is written and no pickle is executed."""
    import pickle

    d, _, _ = archive
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model, bad)
    (bad / "decoder" / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="invalid decoder .*safetensors"):
        run_job(dict(input=str(d), output=str(tmp_path / "o1"), model=str(bad)))
    assert not marker.exists() and not (tmp_path / "o1").exists()

    clap_pt = tmp_path / "evil-clap"
    shutil.copytree(tiny_model, clap_pt)
    shutil.rmtree(clap_pt / "clap")
    import torch
    torch.save({"state_dict": Evil()}, str(clap_pt / "clap.pt"))
    with pytest.raises(ValueError, match="invalid CLAP model .*untrusted checkpoint format"):
        run_job(dict(input=str(d), output=str(tmp_path / "o2"), model=str(clap_pt)))
    assert not marker.exists() and not (tmp_path / "o2").exists()

    # shapes that do not match the config
    from safetensors.torch import load_file, save_file
    wrong = tmp_path / "wrong-shapes"
    shutil.copytree(tiny_model, wrong)
    w = wrong / "decoder" / "model.safetensors"
    sd = load_file(str(w))
    k = next(iter(sd))
    sd[k] = torch.zeros(*[s + 1 for s in sd[k].shape])
    save_file(sd, str(w))
    with pytest.raises(ValueError, match="invalid decoder .*shape mismatch"):
        run_job(dict(input=str(d), output=str(tmp_path / "o3"), model=str(wrong)))


@pytest.mark.parametrize("fuse", [True, False])
def test_model_pools_in_the_plan(ray_local, tiny_model, fuse):
    """Fused: one ClapCaptioner pool (captioner_actors actors, whole GPU when auto and any);
    else ClapEmbedder then Captioner pools. The plan is built, not run (CI has no GPU)."""
    from jobs.caption import CaptionConfig, build

    cfg = CaptionConfig(input="unused", output="unused", model=tiny_model, fuse_models=fuse,
                        captioner_actors=3, encoder_actors=2, gpus_per_actor=0.5,
                        encoder_batch=8)
    clap, dec = os.path.join(tiny_model, "clap"), os.path.join(tiny_model, "decoder")
    op = build(cfg, [("a.wav", "", 100)], clap, dec)._logical_plan.dag
    assert "write_part" in op._name  # the last stage: parts written by workers
    op = op.input_dependencies[0]
    names = []
    while op is not None and "decode_sources" not in op._name:
        names.append(op._name)
        op_last = op
        op = op.input_dependencies[0] if op.input_dependencies else None
    if fuse:
        assert len(names) == 1 and "ClapCaptioner" in names[0], names
        kw = op_last.fn_constructor_kwargs
        assert kw["encoder_batch"] == 8 and kw["clap_kwargs"]["device"] == "cuda"
        # each actor gets the option groups it reads, whole (a new option needs no plumbing)
        cap = kw["captioner_kwargs"]
        assert (cap["decoding"], cap["scoring"]) == (cfg.decoding, cfg.scoring)
        assert kw["clap_kwargs"]["resources"] == cfg.resources
        assert op_last.compute.max_size == 3 and op_last.ray_remote_args["num_gpus"] == 0.5
    else:
        assert [n.split("(")[-1].rstrip(")") for n in names] == ["Captioner", "ClapEmbedder"], names
