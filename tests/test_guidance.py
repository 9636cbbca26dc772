"""Audibility guidance: the scorer's arithmetic, guided decoding (determinism, a forced change of
the chosen caption), the classifier's format and training script, and the caption job with
--guidance. Tiny random models in their real formats; the shipped classifier for the job."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from overheard.guidance import audibility as A
from overheard.decoder import EOS_ID, decode_tokens, load_decoder
from overheard.guidance import GuidanceWeights, GuidedDecoder, combine, score_captions


@pytest.fixture(scope="module")
def parts(tiny_model):
    from overheard.clap import ClapEncoder

    clap = ClapEncoder(os.path.join(tiny_model, "clap"))
    dec, tok = load_decoder(os.path.join(tiny_model, "decoder"))
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((3, clap.embedding_dim)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    return clap, dec, tok, audio


@pytest.fixture(scope="module")
def shipped():
    return A.AudibilityClassifier(A.DEFAULT_MODEL)


# ----------------------------------------------------------------------------- arithmetic
def test_combine_hand_computed():
    lm, sim, aud = [-1.0, -2.0, -0.5], [0.1, 0.5, 0.0], [-0.1, -3.0, -0.2]
    w = GuidanceWeights()  # 0.2 / 1 / 0.015
    assert (w.lm, w.clap, w.audibility) == (0.2, 1.0, 0.015)
    # c0: -0.2 + 0.1 - 0.0015 = -0.1015; c1: -0.4 + 0.5 - 0.045 = 0.055; c2: -0.1 + 0 - 0.003 = -0.103
    np.testing.assert_allclose(combine(lm, sim, aud, w), [-0.1015, 0.055, -0.103], atol=1e-12)
    # audibility weighted 1: c0 -0.2, c1 -2.9, c2 -0.3 -> the audible c0 wins
    np.testing.assert_allclose(combine(lm, sim, aud, "0.2,1,1"), [-0.2, -2.9, -0.3], atol=1e-12)
    assert GuidanceWeights.parse([0, 1, 2]) == GuidanceWeights(0.0, 1.0, 2.0)
    with pytest.raises(ValueError):
        GuidanceWeights.parse("1,2")


def test_guided_step_matches_hand_computation(parts):
    """One decoding step, top-4 candidates: the guided pick equals the argmax of
    0.2*log p(token) + cos(audio, text) + 0.015*log P(audible) computed here by hand."""
    clap, dec, tok, audio = parts
    aud_fn = lambda texts: np.array([-0.1 * len(t) for t in texts])  # noqa: E731  a fake classifier
    g = GuidedDecoder(dec, tok, clap.embed_text, aud_fn, mode="topk", candidates=4, max_new_tokens=1)
    got = g.generate(torch.from_numpy(audio[:1]), audio[:1])[0]
    with torch.inference_mode():
        logp, _ = dec.start(torch.from_numpy(audio[:1]), 1)
    lp = logp[0].masked_fill(dec.banned, -math.inf)
    lp[EOS_ID] = -math.inf
    top_lp, top_tok = lp.topk(4)
    texts = [decode_tokens(tok, [int(t)]) for t in top_tok]
    sims = clap.embed_text(texts) @ audio[0]
    scores = 0.2 * top_lp.double().numpy() + sims + 0.015 * aud_fn(texts)
    best = int(np.argmax(scores))
    assert got.caption == texts[best]
    assert got.score == pytest.approx(scores[best], abs=1e-5)
    assert got.logprob == pytest.approx(float(top_lp[best]), abs=1e-5)
    assert got.clap_similarity == pytest.approx(float(sims[best]), abs=1e-5)
    assert got.audibility_logprob == pytest.approx(aud_fn([texts[best]])[0])


def test_guided_decoding_is_deterministic(parts, shipped):
    clap, dec, tok, audio = parts
    for mode in ("beam", "topk"):
        g = GuidedDecoder(dec, tok, clap.embed_text, shipped.log_prob_audible, mode=mode, beams=2,
                          candidates=2, max_new_tokens=4)
        a = g.generate(torch.from_numpy(audio), audio)
        b = g.generate(torch.from_numpy(audio), audio)
        assert a == b and len(a) == 3
        for r in a:
            assert r.caption and -1.0 <= r.clap_similarity <= 1.0 and r.audibility_logprob <= 0


def test_guidance_changes_the_chosen_candidate(parts):
    """A classifier that finds only one (less likely) token audible, with audibility dominating:
    the guided caption starts with that token while the plain greedy one does not."""
    clap, dec, tok, audio = parts
    cond = torch.from_numpy(audio[:1])
    with torch.inference_mode():
        logp, _ = dec.start(cond, 1)
    lp = logp[0].masked_fill(dec.banned, -math.inf)
    lp[EOS_ID] = -math.inf
    first, third = (int(i) for i in lp.topk(3).indices[[0, 2]])  # most and third most likely
    target = decode_tokens(tok, [third])
    assert target != decode_tokens(tok, [first])
    aud_fn = lambda texts: np.array([0.0 if t == target else -20.0 for t in texts])  # noqa: E731
    off = GuidedDecoder(dec, tok, clap.embed_text, aud_fn, weights=(1, 0, 0), mode="topk",
                        candidates=3, max_new_tokens=1).generate(cond, audio[:1])[0]
    on = GuidedDecoder(dec, tok, clap.embed_text, aud_fn, weights=(0.2, 1, 1), mode="topk",
                       candidates=3, max_new_tokens=1).generate(cond, audio[:1])[0]
    assert off.caption == decode_tokens(tok, [first])  # LM only = greedy
    assert on.caption == target and on.audibility_logprob == 0.0


def test_score_captions(parts, shipped):
    clap, _, _, audio = parts
    caps = ["a dog barks", "the sky is blue", "rain falls"]
    sim, aud = score_captions(caps, audio, clap.embed_text, shipped.log_prob_audible)
    np.testing.assert_allclose(sim, np.einsum("nd,nd->n", clap.embed_text(caps), audio), atol=1e-5)
    assert aud.dtype == np.float32 and (aud <= 0).all()
    sim2, aud2 = score_captions(caps, audio, clap.embed_text, None)
    assert np.isnan(aud2).all() and np.allclose(sim, sim2)


# ----------------------------------------------------------------------------- classifier
def test_shipped_classifier_and_format(tmp_path, shipped):
    texts, labels = A.read_labelled(A.DEFAULT_DATA)
    assert len(texts) >= 300 and 0.3 < np.mean(labels) < 0.7
    held = A.heldout_mask(texts)
    ev = [t for t, h in zip(texts, held) if h]
    ey = np.array([y for y, h in zip(labels, held) if h])
    acc = np.mean((shipped.prob_audible(ev) > 0.5) == (ey == 1))
    assert acc > 0.8, acc  # measured 0.93 (see audibility_metrics.json)
    p = shipped.prob_audible(["a dog barks loudly in the distance", "the sky is blue"])
    assert p[0] > 0.5 > p[1]
    # round trip + refusals
    tok = A.train_tokenizer(texts[:50], 300)
    model = A.build_classifier(A.default_config(len(tok), dim=16, hidden_dim=32), seed=1)
    d = A.save_classifier(model, tok, tmp_path / "clf")
    clf = A.AudibilityClassifier(str(d))
    assert clf.log_prob_audible(["a", "b c"]).shape == (2,)
    np.testing.assert_array_equal(clf.log_prob_audible(["x y"]), A.AudibilityClassifier(str(d)).log_prob_audible(["x y"]))
    (d / "model.safetensors").rename(d / "model.bin")
    with pytest.raises(ValueError, match="pickle"):
        A.load_classifier(d)
    (d / "model.bin").rename(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["overheard"]["format"] = "other"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format"):
        A.load_classifier(d)


def test_read_labelled_jsonl_and_s3(tmp_path, s3_server, s3_bucket):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a bell rings", "label": "audible"}\n\n{"text": "a red car", "label": 0}\n')
    assert A.read_labelled(str(p)) == (["a bell rings", "a red car"], [1, 0])
    s3_server.fs().put(A.DEFAULT_DATA, f"{s3_bucket}/aud/sentences.csv")
    assert A.read_labelled(f"s3://{s3_bucket}/aud/sentences.csv") == A.read_labelled(A.DEFAULT_DATA)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        A.read_labelled(str(bad))


def test_training_script_loss_falls_and_resumes(ray_local, tmp_path):
    from training import audibility as T

    common = ["--out-dir", str(tmp_path / "clf"), "--storage-path", str(tmp_path / "runs"),
              "--num-workers", "1", "--cpus-per-worker", "1", "--warmup-steps", "5", "--batch-size", "16"]
    assert T.main(common + ["--epochs", "1"]) == 0
    assert T.main(common + ["--epochs", "2"]) == 0  # same run: resumes at epoch 1
    m = json.loads((tmp_path / "clf" / "audibility_metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [0, 1]
    steps = m["step_losses"]  # both runs' steps, in order
    assert len(steps) == 2 * (m["n_train"] // 16)
    assert np.mean(steps[-5:]) < 0.7 * np.mean(steps[:5]), steps
    assert m["heldout_accuracy"] > max(0.5, m["majority_baseline"]), m["heldout_accuracy"]
    clf = A.AudibilityClassifier(str(tmp_path / "clf"))
    assert clf.prob_audible(["a dog barks"]).shape == (1,)


# ----------------------------------------------------------------------------- the job
def test_caption_job_with_guidance(ray_local, tiny_model, tmp_path):
    from jobs.caption import main
    from tests import media_factory as mf

    media = tmp_path / "media"
    media.mkdir()
    mf.make_tone(str(media / "a.wav"), seconds=12.0, freq=440)
    mf.make_tone(str(media / "b.wav"), seconds=3.0, freq=880)
    out = tmp_path / "out"
    rc = main([str(media), str(out), "--model", tiny_model, "--guidance", "--num-beams", "2",
               "--guidance-candidates", "2", "--no-progress", "--show", "0"])
    assert rc == 0
    import pyarrow.parquet as pq

    files = sorted((out / "captions").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files])
    assert t.num_rows == 3
    aud = np.array(t["audibility"].to_pylist(), dtype=float)
    sim = np.array(t["clap_similarity"].to_pylist(), dtype=float)
    assert np.isfinite(aud).all() and ((aud >= 0) & (aud <= 1)).all()
    assert np.isfinite(sim).all() and (np.abs(sim) <= 1 + 1e-5).all()
    assert set(t["decoding"].to_pylist()) == {"plain/guided-beam2x2"}
