"""Text-only decoder training end to end on CPU: corpus layouts, gap statistics, the embed-captions
cache, a 2-worker TorchTrainer run (loss falls, injected failure retried from the checkpoint, a rerun
resumes at the next epoch), and the trained model in the caption job (nearest / projection) and in
retrieval decoding.  One trainer run is shared by the assertions (Ray Train start-up ~30 s)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from overheard.tiny import TINY_CAPTIONS

CAPTIONS = list(TINY_CAPTIONS[:20])


# ----------------------------------------------------------------------------- corpus
def test_corpus_reader_layouts(tmp_path):
    from overheard.corpus import fingerprint, read_captions

    # AudioCaps: one caption column among ids; a caption with a comma and one that looks numeric
    (tmp_path / "ac").mkdir()
    (tmp_path / "ac" / "train.csv").write_text(
        'audiocap_id,youtube_id,start_time,caption\n1,a,0,"A dog barks, twice"\n2,b,5,  123 \n'
        '3,c,9,\n4,d,1,"A dog barks, twice"\n')
    assert read_captions(str(tmp_path / "ac" / "train.csv")) == [
        "A dog barks, twice", "123", "A dog barks, twice"]
    assert read_captions(str(tmp_path / "ac"), dedup=True) == ["A dog barks, twice", "123"]
    # Clotho: caption_1..caption_5 read row-major in numeric order (caption_10 after caption_2)
    pq.write_table(pa.table({"file_name": ["x.wav", "y.wav"], "caption_2": ["x2", "y2"],
                             "caption_1": ["x1", None], "caption_10": ["x10", "y10"]}),
                   tmp_path / "clotho.parquet")
    assert read_captions(str(tmp_path / "clotho.parquet")) == ["x1", "x2", "x10", "y2", "y10"]
    # WavCaps: {"data": [{"caption": ...}]} json and jsonl
    (tmp_path / "wc.json").write_text(json.dumps({"num_captions_per_audio": 1, "data": [
        {"id": "1", "caption": "Rain falls."}, {"id": "2", "caption": " Wind blows "}]}))
    (tmp_path / "wc.jsonl").write_text('{"id": 1, "caption": "a bell"}\n\n{"id": 2, "caption": "b"}\n')
    assert read_captions(str(tmp_path / "wc.json")) == ["Rain falls.", "Wind blows"]
    both = read_captions(f"{tmp_path / 'wc.json'},{tmp_path / 'wc.jsonl'}")
    assert both == ["Rain falls.", "Wind blows", "a bell", "b"]
    assert fingerprint(both) == fingerprint(list(both)) != fingerprint(both[::-1])
    with pytest.raises(ValueError, match="no caption column"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        read_captions(str(tmp_path / "bad.csv"))


# ----------------------------------------------------------------------------- gap statistics
def test_gap_statistics_hand_computed(tmp_path):
    from overheard.textonly.gap import estimate, load_gap, noise_variance, save_gap

    # unit vectors in 2-D: pairs (a, t) with a - t = (0, 0), (2, 0)/..., computed by hand
    a = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    t = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    # a - t rows: (0, 0), (-1, 1), (1, -1); per-dim unbiased variance: (0 + 1 + 1)/2 = 1 each
    assert noise_variance(a, t) == pytest.approx(1.0)
    s = estimate(a, t, audio=np.array([[0, 3]], np.float32))       # unnormalised: (0, 1)
    # mean audio over 4 rows = (2/4, 2/4); mean text = (2/3, 1/3)
    np.testing.assert_allclose(s["gap_vector"], [0.5 - 2 / 3, 0.5 - 1 / 3], atol=1e-6)
    assert s["n_pairs"] == 3 and s["n_audio"] == 4 and s["n_text"] == 3
    js, st = save_gap(s, str(tmp_path / "gap.json"))
    for f in (js, st):
        g = load_gap(f)
        np.testing.assert_allclose(g["gap_vector"], s["gap_vector"], atol=1e-6)
        assert g["noise_variance"] == pytest.approx(1.0)


def test_estimate_gap_cli_on_audio(tiny_model, tmp_path):
    from tests import media_factory as mf
    from overheard.textonly.gap import load_gap
    from training.gap import main

    for i, f in enumerate((440, 880)):
        mf.make_tone(str(tmp_path / f"t{i}.wav"), seconds=1.5, sr=48000, freq=f)
    (tmp_path / "pairs.csv").write_text("file_name,caption_1,caption_2\nt0.wav,a low tone,a beep\n"
                                        "t1.wav,a high tone,\n")
    assert main(["--clap", os.path.join(tiny_model, "clap"), "--pairs", str(tmp_path / "pairs.csv"),
                 "--out", str(tmp_path / "g.json")]) == 0
    g = load_gap(str(tmp_path / "g.json"))
    assert g["n_pairs"] == 3 and g["n_audio"] == 3 and g["gap_vector"].shape == (g["dim"],)
    assert g["noise_variance"] > 0
    assert os.path.exists(tmp_path / "g.safetensors")


# ----------------------------------------------------------------------------- retrieval pieces
def test_training_neighbours_exclude_self_and_duplicates():
    from overheard.textonly.retrieval import retrieve, training_neighbours

    e = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]), dim=-1)
    caps = ["a", "b", "c", "a", "d"]   # rows 0 and 3 are the same caption
    nb = training_neighbours(e, caps, 2)
    assert nb[0].tolist() == [1, 4] and nb[3].tolist() == [1, 4]   # never itself or its twin
    assert nb[2].tolist() == [4, 1]
    packed = retrieve(torch.tensor([[0.0, 1.0]]), e, 2)
    assert packed.shape == (1, 3, 2)
    torch.testing.assert_close(packed[0, 1:], e[[2, 4]])


def test_retrieval_decoder_roundtrip_and_captioner(tiny_model, tmp_path):
    from actors.captioner import Captioner
    from jobs.caption_config import DecodingConfig
    from overheard.decoder import DecoderConfig, RetrievalCaptionDecoder, load_decoder, save_decoder
    from overheard.textonly.memory import CaptionMemory
    from overheard.textonly.retrieval import pack
    from overheard.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CAPTIONS, 300)
    cfg = DecoderConfig(embedding_dim=8, prefix_length=2, n_layer=1, n_head=2, n_embd=16,
                        vocab_size=len(tok), max_caption_tokens=12, dropout=0.0)
    torch.manual_seed(0)
    m = RetrievalCaptionDecoder(cfg, 2, tok)
    e = torch.nn.functional.normalize(torch.randn(len(CAPTIONS), 8), dim=-1)
    d = tmp_path / "dec"
    save_decoder(m, tok, d, extra={})
    CaptionMemory(e, CAPTIONS).save(d)
    m2, _ = load_decoder(d)
    x = pack(e[:3], e[3:9].reshape(3, 2, 8))
    assert m.eval().generate(x) == m2.generate(x)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(e[:2].numpy().reshape(-1)), 8)
    batch = pa.table({"audio_embedding": emb, "error_type": pa.array(["", ""]),
                      "clap_id": pa.array(["clap", "clap"])})
    out = Captioner(str(d), DecodingConfig(strategy="retrieval", search="greedy"),
                    device="cpu")(batch)
    assert out["decoding"].to_pylist() == ["retrieval/greedy"] * 2
    with pytest.raises(ValueError, match="use --strategy retrieval"):
        Captioner(str(d), DecodingConfig(strategy="nearest"), device="cpu")


# ----------------------------------------------------------------------------- Ray: embed + train
@pytest.fixture(scope="module")
def trained(ray_local, tiny_model, tmp_path_factory):
    from training.decoder import TrainDecoderConfig, run

    d = tmp_path_factory.mktemp("train-decoder")
    corpus = d / "wavcaps.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    base = dict(output=str(d / "model"), corpus=str(corpus), clap=os.path.join(tiny_model, "clap"),
                cache=str(d / "emb"), storage_path=str(d / "runs"), vocab_size=300, prefix_length=2,
                n_layer=1, n_head=2, n_embd=32, max_caption_tokens=16, dropout=0.0, batch_size=4,
                lr=3e-3, warmup_steps=2, num_workers=2, cpus_per_worker=0.5, embed_batch=8)
    first = run(TrainDecoderConfig(**base, epochs=3, inject_failure_epoch=2))
    second = run(TrainDecoderConfig(**base, epochs=4))          # rerun: resumes at epoch 3
    for name, r in (("first", first), ("second", second)):
        print(f"[train-decoder test] {name}: {r['seconds']} loss "
              f"{[round(h['loss'], 3) for h in r['history']]} tok/s "
              f"{[round(h['tokens_per_s']) for h in r['history']]}")
    return dict(dir=d, base=base, first=first, second=second)


def test_loss_falls_and_failure_is_retried_from_checkpoint(trained):
    h = trained["first"]["history"]
    assert [r["epoch"] for r in h] == [0, 1, 2]
    assert [r["step"] for r in h] == [5, 10, 15]               # 20 captions / global batch 4
    # epoch 2 raised once on its first attempt; the retry started from epoch 1's checkpoint
    assert [r["start_epoch"] for r in h] == [0, 0, 2]
    assert h[-1]["loss"] < h[0]["loss"] - 0.3, h
    assert all(r["tokens_per_s"] > 0 and r["world_size"] == 2 for r in h)


def test_rerun_resumes_at_next_epoch(trained):
    h = trained["second"]["history"]
    assert [r["epoch"] for r in h] == [0, 1, 2, 3]
    assert h[-1]["start_epoch"] == 3 and h[-1]["step"] == 20
    assert h[:3] == trained["first"]["history"]


def test_model_dir_records_gap_handling_and_memory(trained):
    from overheard.decoder import load_decoder
    from overheard.textonly.memory import CaptionMemory

    out = trained["base"]["output"]
    meta = json.load(open(os.path.join(out, "config.json")))
    assert meta["decoder"]["noise_variance"] == pytest.approx(0.013)
    assert meta["decoder"]["embedding_shift"] is None
    assert meta["extra"]["modality_gap"]["mode"] == "noise"
    mem = CaptionMemory.load(out)
    assert mem.captions == CAPTIONS                                  # every caption, in order
    model, tok = load_decoder(out)
    assert model.config.vocab_size == len(tok)


def test_embed_captions_cache_is_reused(trained, tiny_model):
    from training.embed_captions import EmbedCaptionsConfig, read_cache, run

    b = trained["base"]
    m = run(EmbedCaptionsConfig(corpus=b["corpus"], output=b["cache"], clap=b["clap"]))
    assert m["skipped"] and m["count"] == len(CAPTIONS)
    assert m["path"] == trained["first"]["embeddings"]
    caps, emb, _ = read_cache(m["path"])
    assert caps == CAPTIONS and emb.shape[0] == len(CAPTIONS)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    from overheard.clap import ClapEncoder
    np.testing.assert_allclose(emb[:3], ClapEncoder(b["clap"]).embed_text(CAPTIONS[:3]), atol=1e-5)


@pytest.mark.parametrize("strategy", ["nearest", "projection"])
def test_trained_model_in_caption_job(trained, tiny_model, strategy, tmp_path):
    from jobs.caption import CaptionConfig, run
    from tests import media_factory as mf

    wav = tmp_path / "in" / "tone.wav"
    wav.parent.mkdir()
    mf.make_tone(str(wav), seconds=3.0, sr=48000, freq=660)
    out = tmp_path / "out"
    m = run(CaptionConfig(input=str(wav.parent), output=str(out), model=tiny_model,
                          decoder=trained["base"]["output"], strategy=strategy, search="greedy",
                          progress=False, show=0))
    assert m["status"] == "completed" and m["windows"] == 1
    files = sorted((out / "captions").glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    assert [r["decoding"] for r in rows] == [f"{strategy}/greedy"]
    assert rows[0]["caption"].strip()
