"""The caption job with a DALI model, end to end on real parts: local Ray, mp4/m4a made by ffmpeg,
a tiny random LLaVA-1.5-format captioner + tiny CLAP in their real formats, Parquet read back.
``audio+image`` feeds each window's midpoint frame; ``audio`` decodes no video at all."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import media_factory as mf


def read_dir(path) -> pa.Table:
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


@pytest.fixture(scope="module")
def av_archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("av-archive")
    mf.make_av_clip(d / "red.mp4", seconds=12.0, color="red", freq=440.0)    # 2 windows
    mf.make_av_clip(d / "blue.mp4", seconds=4.0, color="blue", freq=1500.0)  # 1 window
    mf.make_tone(d / "tone.m4a", seconds=4.0, freq=660.0)                     # audio only
    mf.make_av_clip(d / "mute.mp4", seconds=3.0, color="green", with_audio=False)
    (d / "broken.mp4").write_bytes(os.urandom(4096))
    return d


def _job(src, out, model, **kw):
    from jobs.caption import CaptionConfig, run
    return run(CaptionConfig(input=str(src), output=str(out), model=str(model), show=0,
                             progress=False, captioner_batch=8, **kw))


def test_window_frames_are_midpoint_frames_and_absent_in_audio_mode(av_archive):
    from actors.windows import decode_sources

    src = pa.table({"source_uri": [str(av_archive / "red.mp4"), str(av_archive / "tone.m4a")],
                    "source_version": ["", ""]})
    t = pa.concat_tables(list(decode_sources(src, frame_size=32)))
    assert "frame" in t.column_names
    frames = t.column("frame").to_pylist()
    uris = t.column("source_uri").to_pylist()
    for u, f in zip(uris, frames):
        if u.endswith("red.mp4"):
            rgb = np.frombuffer(f, np.uint8).reshape(32, 32, 3).reshape(-1, 3).mean(0)
            assert rgb[0] > 150 and rgb[1] < 80 and rgb[2] < 80, rgb  # the red picture
        else:
            assert f == b""  # audio-only file: no frame, the window still goes on
    audio_only = pa.concat_tables(list(decode_sources(src)))
    assert "frame" not in audio_only.column_names
    assert audio_only.num_rows == t.num_rows


def test_dali_caption_job_audio_and_audio_image(ray_local, av_archive, tiny_dali, tmp_path):
    m_av = _job(av_archive, tmp_path / "av", tiny_dali, mode="audio+image")
    assert m_av["status"] == "completed" and m_av["mode"] == "audio+image"
    assert m_av["windows"] == 4 and m_av["windows_with_frames"] == 3
    assert m_av["sources_captioned"] == 3 and m_av["sources_failed"] == 2
    assert set(m_av["failures_by_type"]) == {"no_audio_track", "corrupt"}
    av = read_dir(tmp_path / "av" / "captions").to_pylist()
    by = {(os.path.basename(r["source_uri"]), r["window_index"]): r for r in av}
    assert set(by) == {("red.mp4", 0), ("red.mp4", 1), ("blue.mp4", 0), ("tone.m4a", 0)}
    assert by[("red.mp4", 1)]["start_s"] == 10.0 and abs(by[("red.mp4", 1)]["end_s"] - 12.0) < 0.05
    assert by[("red.mp4", 0)]["decoding"] == "dali-audio+image/greedy"
    assert by[("tone.m4a", 0)]["decoding"] == "dali-audio/greedy"
    assert all(r["caption"] and r["model_id"].startswith("dali-") for r in av)
    assert all(len(r["audio_embedding"]) == 32 and abs(np.linalg.norm(r["audio_embedding"]) - 1) < 1e-4
               for r in av)

    m_a = _job(av_archive, tmp_path / "a", tiny_dali, mode="audio")
    assert m_a["windows"] == 4 and m_a["windows_with_frames"] == 0
    a = {(os.path.basename(r["source_uri"]), r["window_index"]): r
         for r in read_dir(tmp_path / "a" / "captions").to_pylist()}
    assert {r["decoding"] for r in a.values()} == {"dali-audio/greedy"}
    # audio-only input is captioned the same in both modes; the picture changes video windows
    assert a[("tone.m4a", 0)]["caption"] == by[("tone.m4a", 0)]["caption"]
    assert any(a[k]["caption"] != by[k]["caption"] for k in by if not k[0].endswith(".m4a"))
    # same windows, same CLAP pass: identical embeddings whatever the mode
    assert np.allclose(a[("red.mp4", 0)]["audio_embedding"], by[("red.mp4", 0)]["audio_embedding"])


def test_mode_and_window_checks(tiny_dali, tiny_model, av_archive, tmp_path):
    with pytest.raises(ValueError, match="needs a DALI model"):
        _job(av_archive, tmp_path / "x", tiny_model, mode="audio+image")
    with pytest.raises(ValueError, match="longer than the DALI audio encoder"):
        _job(av_archive, tmp_path / "y", tiny_dali, window=20.0)
    with pytest.raises(ValueError, match="--mode"):
        _job(av_archive, tmp_path / "z", tiny_dali, mode="video")


def _actor_op(ds):
    op = ds._logical_plan.dag.input_dependencies[0]  # before the part writer: the DALI pool
    assert "DaliCaptioner" in op._name, op._name
    return op


@pytest.mark.parametrize("gpus", [0.25, 1.0, -1.0])
def test_dali_pool_takes_gpu_fractions_and_bf16(ray_local, tiny_dali, gpus):
    """A fraction of a GPU or a whole one per actor, in bf16, reaches Ray's resource request
    (the plan is built, not run: CI has no GPU to schedule on)."""
    from jobs.caption import CaptionConfig, build

    d = str(tiny_dali / "dali")
    cfg = CaptionConfig(input="unused", output="unused", model=str(tiny_dali), mode="audio+image",
                        gpus_per_actor=gpus, dtype="bfloat16", captioner_actors=2)
    op = _actor_op(build(cfg, [("a.mp4", "")], str(tiny_dali / "clap"), d, d, 32))
    want = gpus if gpus >= 0 else 0.0  # auto: a whole GPU when the cluster has any; here none
    assert op.ray_remote_args.get("num_gpus", 0) == want
    assert op.fn_constructor_kwargs["device"] == ("cuda" if want > 0 else "cpu")
    assert op.fn_constructor_kwargs["resources"].dtype == "bfloat16"
    assert op.fn_constructor_kwargs["dali"].mode == "audio+image"
    assert op.compute.max_size == 2
