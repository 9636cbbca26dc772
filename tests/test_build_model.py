"""`overheard build-model` end to end on the tiny CLAP (local Ray: Ray Data embedding, Ray Train
decoder, the caption job for the evaluation), whole-clip windows on 15- and 25-s clips (Clotho's
range), and `overheard evaluate --windowing first|whole` on caption tables."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs import evaluate as ev
from tests import media_factory as mf

SOUNDS = ["a dog barks", "rain falls on a roof", "a car engine idles", "a bell rings twice",
          "birds sing in the trees", "a man speaks quietly", "water flows in a stream",
          "a door slams shut"]


def _corpus(path) -> str:
    """40 captions in the Clotho layout (file_name, caption_1..5)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for i, s in enumerate(SOUNDS):
            w.writerow([f"c{i}.wav", s, f"{s} nearby", f"{s} far away", f"you can hear {s}",
                        f"{s} and then silence"])
    return str(path)


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """Two clips of 15 and 25 s (Clotho's lengths are 15-30 s), references, and 3 gap pairs."""
    d = tmp_path_factory.mktemp("eval-set")
    audio = d / "audio"
    audio.mkdir()
    mf.make_tone(str(audio / "long_a.wav"), seconds=15.0, sr=44100, freq=440)
    # 25 s whose 10-s chunks differ (tone, noise, higher tone), so a chunk mean is not any chunk
    import soundfile as sf
    t = np.arange(10 * 48000) / 48000
    noise = np.random.default_rng(0).standard_normal(10 * 48000) * 0.1
    sf.write(str(audio / "long_b.flac"), np.concatenate([
        0.3 * np.sin(2 * np.pi * 880 * t), noise, 0.3 * np.sin(2 * np.pi * 3000 * t[:5 * 48000])]
    ).astype(np.float32), 48000)
    refs = d / "refs.csv"
    with open(refs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        w.writerow(["long_a.wav"] + SOUNDS[:5])
        w.writerow(["long_b.wav"] + SOUNDS[3:])  # .flac captioned, .wav referenced: stem match
    pairs_dir = d / "pairs"
    pairs_dir.mkdir()
    with open(pairs_dir / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        for i, hz in enumerate((300, 600, 1200)):
            mf.make_tone(str(pairs_dir / f"p{i}.wav"), seconds=2.0, freq=hz)
            w.writerow([f"p{i}.wav", SOUNDS[i]])
    return {"audio": str(audio), "refs": str(refs), "pairs": str(pairs_dir / "pairs.csv"),
            "corpus": _corpus(d / "corpus.csv")}


def test_build_model_end_to_end_then_caption_whole_clips(tiny_model, eval_set, ray_local,
                                                         tmp_path):
    from jobs.build_model import main

    out = str(tmp_path / "built")
    rc = main([out, "--clap", os.path.join(tiny_model, "clap"), "--corpus", eval_set["corpus"],
               "--pairs", eval_set["pairs"], "--references", eval_set["refs"],
               "--eval-audio", eval_set["audio"], "--eval-metrics", "bleu,cider_d",
               "--eval-tokenizer", "simple", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
               "--prefix-length", "2", "--vocab-size", "200", "--epochs", "1",
               "--batch-size", "16", "--warmup-steps", "1", "--num-workers", "1"])
    assert rc == 0
    # the model directory: CLAP copied byte for byte, a decoder, a card
    for f in ("config.json", "model.safetensors"):
        assert open(os.path.join(out, "clap", f), "rb").read() == open(
            os.path.join(tiny_model, "clap", f), "rb").read()
    assert os.path.exists(os.path.join(out, "decoder", "config.json"))
    rec = json.load(open(os.path.join(out, "build.json")))
    gap = json.load(open(os.path.join(out + "-work", "gap.json")))
    # the decoder trained with the sigma^2 estimated from the 3 pairs, not the 0.013 default
    assert rec["gap"]["n_pairs"] == 3
    assert rec["gap_settings"]["noise_variance"] == pytest.approx(gap["noise_variance"])
    assert gap["noise_variance"] != pytest.approx(0.013)
    assert rec["corpus"]["captions"] == 5 * len(SOUNDS)
    assert rec["training"]["steps"] == 3 and rec["training"]["loss_last_epoch"] > 0  # 40/16
    card = open(os.path.join(out, "MODEL_CARD.md")).read()
    for needle in (eval_set["corpus"], "estimated from 3 audio-caption pairs",
                   f"{gap['noise_variance']:.5f}", "| cider_d |", "whole clips"):
        assert needle in card, needle
    e = rec["evaluation"]
    assert e["windowing"] == "whole" and e["n_scored"] == 2 and set(e["metrics"]) == {
        "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d"}

    # captioned with the built model: one whole-clip window per 15-/25-s clip
    cap = os.path.join(out + "-work", "evaluation", "captions")
    t = pa.concat_tables([pq.read_table(os.path.join(cap, f)) for f in sorted(os.listdir(cap))])
    rows = sorted(t.select(["source_uri", "window_index", "start_s", "end_s"]).to_pylist(),
                  key=lambda r: r["source_uri"])
    assert [(os.path.basename(r["source_uri"]), r["window_index"]) for r in rows] == [
        ("long_a.wav", 0), ("long_b.flac", 0)]
    assert [round(r["end_s"], 1) for r in rows] == [15.0, 25.0]
    assert all(c for c in t.column("caption").to_pylist())

    # the whole-clip embedding is CLAP's normalised mean over the clip's 10-s chunks
    # (0-10, 10-20, 20-25 s repeat-padded), not its first window
    from overheard.clap import ClapEncoder
    from overheard.media import decode_windows, model_input
    enc = ClapEncoder(os.path.join(out, "clap"))
    b = t.filter(pc.ends_with(t.column("source_uri"), "long_b.flac"))
    got = np.asarray(b.column("audio_embedding").to_pylist()[0], dtype=np.float32)
    chunks = np.stack([model_input(w.samples, 480000, 480000)[0] for w in decode_windows(
        os.path.join(eval_set["audio"], "long_b.flac"), window_s=10.0)])
    assert len(chunks) == 3
    per = enc.embed_audio(chunks)
    mean = per.mean(0) / np.linalg.norm(per.mean(0))
    np.testing.assert_allclose(got, mean, atol=2e-3)
    assert not np.allclose(got, per[0], atol=2e-3)  # not the first window's embedding


def _table(path, rows) -> str:
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(
        ("source_uri", "window_index", "caption"))}), os.path.join(path, "part-0.parquet"))
    return str(path)


def test_evaluate_says_which_windows_it_scored(tmp_path, capsys):
    refs = os.path.join(tmp_path, "refs.csv")
    with open(refs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1"])
        w.writerow(["a.wav", "a dog barks"])
        w.writerow(["b.wav", "rain falls"])
    windowed = _table(tmp_path / "windowed", [("/m/a.wav", 0, "a dog barks"),
                                              ("/m/a.wav", 1, "a cat meows"),
                                              ("/m/b.wav", 0, "rain falls")])
    rep = ev.evaluate(windowed, refs, "bleu_1", "simple")
    assert rep["windowing"] == "first" and rep["clips_with_unscored_windows"] == ["a.wav"]
    assert rep["per_clip"]["a.wav"]["caption"] == "a dog barks"
    with pytest.raises(ValueError, match="1 of 2 clips have several windows.*--whole-clip"):
        ev.evaluate(windowed, refs, "bleu_1", "simple", windowing="whole")
    assert ev.main([windowed, refs, "--metrics", "bleu_1", "--tokenizer", "simple",
                    "--windowing", "whole"]) == 2
    assert "--whole-clip" in capsys.readouterr().err
    whole = _table(tmp_path / "whole", [("/m/a.wav", 0, "a dog barks"),
                                        ("/m/b.wav", 0, "rain falls")])
    assert ev.main([whole, refs, "--metrics", "bleu_1", "--tokenizer", "simple",
                    "--windowing", "whole"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("scored: whole clips") and "NOTE" not in text
    assert json.load(open(os.path.join(whole, "evaluation.json")))["windowing"] == "whole"
