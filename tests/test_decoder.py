"""Caption decoder: loss masking, batched greedy/beam decoding, checkpoint format, a tiny overfit."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from overheard.decoder import DecoderConfig, encode_captions, load_decoder, save_decoder
from overheard.tiny import build_tiny_decoder

DIM = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp("dec") / "tiny", embedding_dim=DIM, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_decoder(tiny_dir)


def embeddings(n, seed=0, dim=DIM):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------- config
def test_config_json_round_trip_and_validation():
    cfg = DecoderConfig(embedding_dim=8, n_embd=16, n_head=2, vocab_size=300, embedding_shift=[0.5] * 8,
                        noise_variance=0.013, mapper="transformer")
    assert DecoderConfig.from_json(cfg.to_json()) == cfg
    d = cfg.to_dict()
    del d["n_embd"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['n_embd'\]"):
        DecoderConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown mapper 'lstm'"):
        DecoderConfig.from_dict({**cfg.to_dict(), "mapper": "lstm"})
    with pytest.raises(ValueError, match="embedding_shift has 3 values"):
        DecoderConfig(embedding_dim=8, embedding_shift=[0.0] * 3).validate()


# ------------------------------------------------------------------------- loss
def test_forward_loss_counts_caption_tokens_only(tiny):
    model, tok = tiny
    ids, mask = encode_captions(tok, ["a dog barks", "rain falls steadily on a tin roof"], 24)
    assert mask[0].sum() < mask[1].sum()  # row 0 is right-padded
    emb = embeddings(2)
    out = model(emb, ids, mask)
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (*ids.shape, model.config.vocab_size)

    # By hand: run the LM on [prefix; tokens], drop the P prefix positions, score input t+1 from
    # position t only where the mask says t+1 is a real token (<s> never a target, pads skipped).
    with torch.no_grad():
        p = model.config.prefix_length
        x = torch.cat([model.prefix(emb), model.lm.transformer.wte(ids)], dim=1)
        logits = model.lm(inputs_embeds=x).logits[:, p:]
        terms = [-F.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
                 for b in range(2) for t in range(ids.shape[1] - 1) if mask[b, t + 1]]
        assert len(terms) == int(mask[:, 1:].sum())
        assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)

        # Pad positions cannot matter: scramble their ids, the loss is unchanged.
        scrambled = ids.clone()
        scrambled[mask == 0] = 300
        assert model(emb, scrambled, mask).loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


# ------------------------------------------------------------------------- decoding
def test_greedy_batch_equals_single_rows(tiny):
    model, _ = tiny
    emb = embeddings(6, seed=1)
    batch = model.generate(emb)
    assert len(batch) == 6
    for i in range(6):
        (text, score), = model.generate(emb[i:i + 1])
        assert text == batch[i][0]
        assert score == pytest.approx(batch[i][1], abs=1e-5)  # BLAS blocking differs with B
    assert model.generate(emb) == batch  # deterministic


def test_beam_one_equals_greedy_and_beam_is_batched(tiny):
    model, _ = tiny
    emb = embeddings(5, seed=2)
    g_ids, g_sc = model.generate_ids(emb, "greedy")
    b_ids, b_sc = model.generate_ids(emb, "beam", num_beams=1)
    assert b_ids == g_ids and b_sc == pytest.approx(g_sc, abs=1e-6)
    beam = model.generate_ids(emb, "beam", num_beams=3)
    for i in range(5):
        ids, sc = model.generate_ids(emb[i:i + 1], "beam", num_beams=3)
        assert ids[0] == beam[0][i] and sc[0] == pytest.approx(beam[1][i], abs=1e-5)
    assert model.generate_ids(emb, "beam", num_beams=3) == beam


def test_generation_limits_and_errors(tiny):
    model, _ = tiny
    emb = embeddings(2)
    ids, _ = model.generate_ids(emb, max_new_tokens=3)
    assert all(len(s) <= 3 for s in ids)
    assert all(not ({0, 1, 3, 4} & set(s)) for s in model.generate_ids(emb)[0])  # specials banned
    with pytest.raises(ValueError, match="unknown decoding method"):
        model.generate(emb, method="sample")
    with pytest.raises(ValueError, match="clap_emb must be"):
        model.generate(torch.zeros(2, DIM + 1))
    assert model.generate(emb[:0]) == []


def test_transformer_mapper_decodes_batched(tmp_path):
    model, _ = load_decoder(build_tiny_decoder(tmp_path / "t", embedding_dim=DIM, mapper="transformer"))
    emb = embeddings(3, seed=3)
    batch = model.generate(emb)
    assert [model.generate(emb[i:i + 1])[0][0] for i in range(3)] == [t for t, _ in batch]


# ------------------------------------------------------------------------- checkpoints
def test_tiny_build_is_small_and_byte_identical(tiny_dir, tmp_path):
    again = build_tiny_decoder(tmp_path / "again", embedding_dim=DIM, seed=0)
    other = build_tiny_decoder(tmp_path / "other", embedding_dim=DIM, seed=1)
    assert digest(again) == digest(tiny_dir)
    assert digest(other)["model.safetensors"] != digest(tiny_dir)["model.safetensors"]
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 500_000
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(digest(tiny_dir))


def test_save_load_round_trip_generates_identically(tiny, tmp_path):
    model, tok = tiny
    emb = embeddings(4, seed=4)
    save_decoder(model, tok, tmp_path / "copy", extra={"note": "round trip"})
    back, tok2 = load_decoder(tmp_path / "copy")
    assert back.extra == {"note": "round trip"}
    assert back.generate(emb) == model.generate(emb)
    assert back.generate(emb, method="beam") == model.generate(emb, method="beam")
    assert tok2.get_vocab() == tok.get_vocab()


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_load_rejects_wrong_shape_missing_key_and_pickle(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_dir / "model.safetensors"))

    bad = _copy(tiny_dir, tmp_path / "shape")
    save_file({**state, "lm.transformer.wpe.weight": state["lm.transformer.wpe.weight"][:5]},
              str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch for lm\.transformer\.wpe\.weight"):
        load_decoder(bad)

    bad = _copy(tiny_dir, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "lm.transformer.ln_f.bias"}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['lm\.transformer\.ln_f\.bias'\]"):
        load_decoder(bad)

    bad = _copy(tiny_dir, tmp_path / "pickle")
    (bad / "model.safetensors").unlink()
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle checkpoint.*only safetensors are accepted"):
        load_decoder(bad)
    (bad / "pytorch_model.bin").rename(bad / "model.safetensors")  # a pickle wearing the right name
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_decoder(bad)

    bad = _copy(tiny_dir, tmp_path / "config")
    meta = json.loads((bad / "config.json").read_text())
    meta["decoder"]["mapper"] = "lstm"
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown mapper 'lstm'"):
        load_decoder(bad)
    del meta["decoder"]["vocab_size"]
    meta["decoder"]["mapper"] = "mlp"
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['vocab_size'\]"):
        load_decoder(bad)


# ------------------------------------------------------------------------- end to end
def test_few_steps_fit_captions_from_text_embeddings(tiny_dir):
    """30 Adam steps on 4 captions with fixed random stand-ins for CLAP text embeddings: the
    loss falls (measured 6.2 -> 0.3) and greedy decoding gives each caption back."""
    model, tok = load_decoder(tiny_dir)
    captions = ["a dog barks while cars pass by", "rain falls steadily on a tin roof",
                "a crowd cheers and applauds", "a clock ticks in a silent room"]
    emb = embeddings(4, seed=5)
    ids, mask = encode_captions(tok, captions, model.config.max_caption_tokens)
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model(emb, ids, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    assert [t for t, _ in model.generate(emb)] == captions
    assert [t for t, _ in model.generate(emb, method="beam", num_beams=3)] == captions
