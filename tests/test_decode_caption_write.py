"""The caption job's CPU-only stage shape (jobs/pipeline.py, actors/decode_caption_write.py): each
model actor decodes its blocks and writes their parts. Real local Ray, real media made by
ffmpeg/sox, the tiny random-weight model; parts read back with pyarrow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests import media_factory as mf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_path_imports_no_model_libraries():
    """What a decode task worker imports (the decode UDF's module and what it runs) stays free of
    torch / transformers / scipy: each would cost every decode worker process seconds of CPU."""
    code = ("import sys, json; import jobs.pipeline, actors.part_writer, actors.windows; "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'scipy', 'sklearn') "
            "if m in sys.modules)))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []


def test_fused_pool_is_one_actor_per_cpu():
    from jobs.pools import pool_size

    # split CPU-only pools: one model actor per 4 CPUs; decoding actors: one per CPU
    assert pool_size(0, 1, 0.0, 0.0, 16.0) == (1, 4)
    assert pool_size(0, 1, 0.0, 0.0, 16.0, cpus_each=1.0) == (1, 16)
    assert pool_size(3, 1, 0.0, 0.0, 16.0, cpus_each=1.0) == (1, 3)


def _archive(d):
    d.mkdir()
    mf.make_tone(str(d / "tone 25s.wav"), seconds=25.0, sr=44100, channels=2, freq=440)
    mf.make_tone(str(d / "long_45s.flac"), seconds=45.0, sr=16000, channels=1, freq=880)
    mf.make_speech(str(d / "speech.mp3"), "a bell rings twice")
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    return d


def _parts(out: str, kind: str):
    d = os.path.join(out, kind)
    names = sorted(f for f in os.listdir(d) if f.endswith(".parquet")) if os.path.isdir(d) else []
    return [pq.read_table(os.path.join(d, f)).drop_columns(["run_id"]) for f in names]


def test_fused_stage_writes_what_the_split_stages_write(ray_local, tiny_model, tmp_path):
    """--decode-in-actors (one actor stage, no GPUs here) and the default split stages write the
    same parts, row for row (captions, embeddings, failures), and the same per-part counts."""
    from jobs.caption import CaptionConfig, run
    from jobs.pipeline import build

    src = _archive(tmp_path / "a")
    outs, manifests = {}, {}
    for fused in (True, False):
        out = str(tmp_path / f"out-{fused}")
        cfg = CaptionConfig(input=str(src), output=out, model=tiny_model, progress=False,
                            show=0, decode_in_actors=fused, run_id="same")
        manifests[fused] = run(cfg)
        outs[fused] = out
        # the plan: one actor stage when fused, decode tasks + model actor + writer tasks when not
        op = build(cfg, [(str(src / "tone 25s.wav"), "")], tiny_model + "/clap",
                   tiny_model + "/decoder")._logical_plan.dag
        ops = []
        while op is not None:
            ops.append(op.name)
            op = op.input_dependencies[0] if op.input_dependencies else None
        want = (["MapBatches(DecodeCaptionWrite)"] if fused else
                ["MapBatches(write_part_here)", "MapBatches(ClapCaptioner)",
                 "MapBatches(decode_sources_here)"])
        # below the stages: the todo list's read tasks cut into one-row blocks (jobs/pipeline.py)
        assert ops[:-2] == want and ops[-2].startswith("StreamingRepartition"), ops
    for kind in ("captions", "failures"):
        a, b = _parts(outs[True], kind), _parts(outs[False], kind)
        assert len(a) == len(b) and a, kind
        for x, y in zip(a, b):
            assert x.equals(y), kind
    caps = pq.read_table(os.path.join(outs[True], "captions"))
    assert caps.num_rows == 3 + 5 + 1  # 25 s, 45 s, a short speech clip: 10-s windows
    for k in ("windows", "sources_captioned", "sources_failed", "failures_by_type"):
        assert manifests[True][k] == manifests[False][k], k
    assert manifests[True]["sources_failed"] == 1, "the broken file is one failure row"


def test_fused_stage_drops_embeddings_when_asked(ray_local, tiny_model, tmp_path):
    from jobs.caption import CaptionConfig, run

    src = tmp_path / "a"
    src.mkdir()
    mf.make_tone(str(src / "t.wav"), seconds=12.0, sr=16000, channels=1, freq=440)
    out = str(tmp_path / "out")
    m = run(CaptionConfig(input=str(src), output=out, model=tiny_model, progress=False, show=0,
                          embeddings=False, decode_in_actors=True))
    caps = pq.read_table(os.path.join(out, "captions"))
    assert m["windows"] == caps.num_rows == 2
    assert "audio_embedding" not in caps.column_names


def test_decode_in_actors_needs_the_fused_model_actor():
    from jobs.caption_config import CaptionConfig, OptionError
    from jobs.config_cli import check

    with pytest.raises(OptionError, match="--decode-in-actors decodes in the fused"):
        check(CaptionConfig(input="a", output="b", decode_in_actors=True, fuse_models=False))
    check(CaptionConfig(input="a", output="b", decode_in_actors=True))
