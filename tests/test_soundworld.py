"""The sound world (deterministic scenes with compositional captions) and the contrastive CLAP
training script (a few Ray Train steps, checkpoint + resume, loadable HF model directory)."""

from __future__ import annotations

import csv
import functools
import json
import os
import re

import numpy as np
import pytest

from overheard import soundworld as sw

# words any caption of a source must contain (one of), and must not appear without that source
KEYWORDS = {
    "dog": r"\bdog\b", "beep_high": r"\b(high|shrill)", "beep_low": r"\b(low|deep)\b", "knock": r"\b(knock|rap)",
    "rain": r"\brain\b", "engine": r"\b(engine|motor)\b", "siren": r"\bsiren\b", "birds": r"\bbirds\b",
    "typing": r"\b(typ|keyboard)", "man": r"\b(man|male)\b", "woman": r"\b(woman|female)\b",
}


@functools.lru_cache(maxsize=None)
def _scene(seed):
    return sw.make_scene(seed)


def test_same_seed_same_scene_and_different_seeds_differ():
    a1, c1, m1 = sw.make_scene(1234)
    a2, c2, m2 = sw.make_scene(1234)
    assert a1.dtype == np.float32 and a1.shape == (sw.N_SAMPLES,) == (480_000,)
    assert a1.tobytes() == a2.tobytes()
    assert c1 == c2 and m1 == m2
    a3, c3, _ = sw.make_scene(1235)
    assert a3.tobytes() != a1.tobytes()
    assert c3 != c1


@pytest.mark.parametrize("seed", range(40))
def test_captions_name_exactly_the_mixed_sources(seed):
    audio, caps, meta = _scene(seed)
    assert len(caps) == sw.N_CAPTIONS == 5 and len(set(caps)) == 5
    present = {s["name"] for s in meta["sources"]}
    assert 1 <= len(present) <= 3 and present <= set(sw.SOURCES)
    for cap in caps:
        low = cap.lower()
        for name, pat in KEYWORDS.items():
            assert bool(re.search(pat, low)) == (name in present), (name, cap, meta)
        for s in meta["sources"]:  # a count, when said, is the true one
            if s["count"] in sw.COUNT_WORDS and sw.SOURCES[s["name"]]["kind"] == "event" and len(present) == 1:
                said = [w for w in sw.COUNT_WORDS.values() if w in low]
                assert said in ([], [sw.COUNT_WORDS[s["count"]]]), (cap, s)
    # temporal layout matches the relation
    fg = sorted((s for s in meta["sources"] if s["role"] == "foreground"), key=lambda s: s["onset"])
    for s in meta["sources"]:
        assert 0 <= s["onset"] < s["offset"] <= sw.DURATION_S
    if meta["relation"] in ("sequence", "overlap_sequence"):
        assert fg[0]["offset"] <= fg[1]["onset"]


@pytest.mark.parametrize("seed", range(40))
def test_loudness_sane(seed):
    audio, _, meta = _scene(seed)
    peak = float(np.abs(audio).max())
    rms_db = 20 * np.log10(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    assert peak < 0.99, meta            # no clipping
    assert -45 < rms_db < -12, meta     # not silent, not blasting
    # every source is audible where it plays: energy there is well above the noise floor
    for s in meta["sources"]:
        seg = audio[int(s["onset"] * sw.SR):int(s["offset"] * sw.SR)]
        assert np.sqrt(np.mean(seg.astype(np.float64) ** 2)) > 1e-3, (s, meta)


def test_all_sources_occur_and_recordings_used():
    seen = set()
    for seed in range(40):
        seen |= {s["name"] for s in _scene(seed)[2]["sources"]}
    assert seen == set(sw.SOURCES)
    if os.path.isdir(sw.BUCKLE_DIR):
        assert sw.has_recordings()


def test_write_dataset_files_decode(tmp_path):
    import pyarrow.parquet as pq
    import soundfile as sf

    d = sw.write_dataset(str(tmp_path), 4, seed=3, split="eval")
    with open(os.path.join(d, "captions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5", "sources"]
    table = pq.read_table(os.path.join(d, "captions.parquet")).to_pylist()
    assert [r["file"] for r in table] == [r["file_name"] for r in rows]
    for i, r in enumerate(table):
        x, sr = sf.read(os.path.join(d, r["file"]), dtype="float32")
        assert sr == 48_000 and x.shape == (480_000,)
        ref, caps, meta = sw.make_scene(sw.clip_seed(3, "eval", i))
        assert np.abs(x - ref).max() < 2 / 32768  # 16-bit PCM of the same scene
        assert [r[f"caption_{j}"] for j in range(1, 6)] == caps
        assert r["sources"].split() == sorted({s["name"] for s in meta["sources"]})
        assert json.loads(r["meta"])["seed"] == r["seed"]


def test_contrastive_training_learns_checkpoints_and_resumes(ray_local, tmp_path):
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    from overheard.tokenizer import load_tokenizer
    from training import clap_contrastive as cc

    out = str(tmp_path / "clap")
    common = ["--tiny", "--out-dir", out, "--data-dir", str(tmp_path / "cache"), "--n-train", "32",
              "--n-eval", "8", "--batch-size", "8", "--cpus-per-worker", "0.5", "--prep-tasks", "1"]
    first = cc.main(common + ["--epochs", "2", "--num-workers", "2"])  # DDP, negatives gathered
    hist1 = first["history"]
    assert [h["epoch"] for h in hist1] == [0, 1]

    # a rerun with the same run name resumes after epoch 1: epochs 0-1 are carried over, only 2 runs
    second = cc.main(common + ["--epochs", "3", "--num-workers", "1"])
    hist2 = second["history"]
    assert [h["epoch"] for h in hist2] == [0, 1, 2]
    assert hist2[:2] == hist1
    assert hist2[2]["train_loss"] < hist2[0]["train_loss"]  # the contrastive loss falls
    assert os.path.basename(second["checkpoint"]) != os.path.basename(first["checkpoint"])

    # a loadable HF model directory
    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(out, f)), f
    model = ClapModel.from_pretrained(out).eval()
    fe = ClapFeatureExtractor.from_pretrained(out)
    tok = load_tokenizer(out)
    audio, caps, _ = sw.make_scene(7)
    feats = fe(audio, sampling_rate=48_000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        a = model.get_audio_features(input_features=feats).pooler_output
        t = model.get_text_features(**tok(caps, padding=True, return_tensors="pt")).pooler_output
    assert a.shape == (1, cc.TINY["projection_dim"]) and t.shape == (5, cc.TINY["projection_dim"])
    try:
        from overheard.clap import ClapEncoder
    except ImportError:
        return
    enc = ClapEncoder(out)
    e = np.asarray(enc.embed_audio(audio[None]))
    assert e.shape == (1, cc.TINY["projection_dim"])
    assert np.allclose(e, a.numpy(), atol=1e-4)
