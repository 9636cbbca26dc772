"""DALI model code against transformers' own LLaVA: prompt assembly, image preprocessing,
batched generation, NLL, checkpoints. Tiny random LLaVA-1.5-format model (same class as
llava-hf/llava-1.5-7b-hf) + tiny random CLAP, both built and saved in their real formats."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from overheard.dali.llava import FrozenLlava, ImagePreprocess
from overheard.dali.model import DaliModel, is_dali, read_dali_config


@pytest.fixture(scope="module")
def dali_dir(tiny_dali):
    return tiny_dali


@pytest.fixture(scope="module")
def dali(dali_dir):
    return DaliModel(str(dali_dir / "dali"))


def _windows(n, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, 480000)) * 0.1).astype(np.float32)


def _frames(n, seed=1, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_tiny_llava_is_the_real_class_and_format(dali_dir):
    from transformers import LlavaForConditionalGeneration

    files = set(os.listdir(dali_dir / "llava"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    m = LlavaForConditionalGeneration.from_pretrained(str(dali_dir / "llava"), local_files_only=True)
    assert m.config.vision_feature_select_strategy == "default" and m.config.vision_feature_layer == -2
    assert os.path.getsize(dali_dir / "llava" / "model.safetensors") < 2_000_000


def test_image_preprocess_matches_clip_arithmetic():
    cfg = {
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
        "rescale_factor": 1 / 255, "image_mean": [0.5, 0.25, 0.125], "image_std": [0.5, 0.25, 0.2]}
    pre = ImagePreprocess(cfg)
    # already at crop size: only rescale + normalise, computed by hand
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    want = (x.astype(np.float64) / 255 - np.array([0.5, 0.25, 0.125])) / np.array([0.5, 0.25, 0.2])
    got = pre(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    assert np.allclose(got, want, atol=1e-5)
    # a constant 40x80 frame: shortest edge -> 32 (32x64), centre crop 32x32, still constant
    c = np.zeros((1, 40, 80, 3), np.uint8)
    c[..., 0], c[..., 1], c[..., 2] = 200, 100, 50
    out = pre(torch.from_numpy(c))
    assert out.shape == (1, 3, 32, 32)
    assert np.allclose(out[0, :, 5, 7].numpy(), (np.array([200, 100, 50]) / 255 - [0.5, 0.25, 0.125])
                       / np.array([0.5, 0.25, 0.2]), atol=1e-3)
    # centre crop keeps the middle: left third red, rest blue -> crop of the 64-wide resize is blue-ish
    half = np.zeros((1, 32, 96, 3), np.uint8)
    half[:, :, :32, 0] = 255
    half[:, :, 32:, 2] = 255
    mid = pre(torch.from_numpy(half))[0, :, 16, 16]
    assert mid[2] > mid[0]


def test_assembled_inputs_equal_llava_own_forward(dali_dir):
    """Image-only input built by FrozenLlava == transformers' LLaVA on input_ids with <image>
    placeholders + pixel_values: same vision layer, CLS dropping, projector and token order."""
    from transformers import LlavaForConditionalGeneration

    fl = FrozenLlava(str(dali_dir / "llava"))
    frames = _frames(2)
    seg = fl.project(fl.vision_tokens(frames))
    assert seg.shape == (2, 16, fl.lm_dim)
    embeds = fl.inputs([seg])
    ref = LlavaForConditionalGeneration.from_pretrained(str(dali_dir / "llava"), local_files_only=True).eval()
    tok = fl.tokenizer
    before, after = fl.template.format(prompt=fl.prompt).split("<image>")
    text = before + "<image>" * 16 + after
    ids = tok([text, text], return_tensors="pt").input_ids
    assert ids.shape[1] == embeds.shape[1]
    pv = fl.preprocess(torch.from_numpy(frames))
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv).logits[:, -1]
        h = fl.model.model.language_model(inputs_embeds=embeds).last_hidden_state
        got = fl.model.lm_head(h[:, -1])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_nll_equals_llava_loss_on_caption_tokens(dali_dir):
    from transformers import LlavaForConditionalGeneration

    fl = FrozenLlava(str(dali_dir / "llava"))
    frames = _frames(1, seed=3)
    caption = "a dog barks"
    embeds = fl.inputs([fl.project(fl.vision_tokens(frames))])
    with torch.no_grad():
        got = fl.nll(embeds, [caption])
    ref = LlavaForConditionalGeneration.from_pretrained(str(dali_dir / "llava"), local_files_only=True).eval()
    before, after = fl.template.format(prompt=fl.prompt).split("<image>")
    prompt_ids = fl.tokenizer(before + "<image>" * 16 + after).input_ids
    cap_ids = fl.tokenizer(caption, add_special_tokens=False).input_ids + [fl.eos]
    ids = torch.tensor([prompt_ids + cap_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + cap_ids])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=fl.preprocess(torch.from_numpy(frames)), labels=labels).loss
    assert abs(float(got) - float(want)) < 1e-4


def test_generation_is_deterministic_and_batch_invariant(dali):
    w, f = _windows(4), _frames(4)
    a, emb = dali.caption(w)
    again, _ = dali.caption(w)
    assert [g.caption for g in a] == [g.caption for g in again]
    assert all(g.caption and g.n_tokens > 0 and np.isfinite(g.logprob) for g in a)
    singles = [dali.caption(w[i:i + 1])[0][0].caption for i in range(4)]
    assert singles == [g.caption for g in a]
    av, _ = dali.caption(w, f)
    assert [g.caption for g in av] != [g.caption for g in a]  # the frames reach the LM
    assert len({g.caption for g in a}) > 1  # and so does the audio
    # the CLAP embedding comes from the same tower pass as the tokens
    assert np.allclose(emb, dali.clap.embed_audio(w), atol=1e-5)


def test_seeded_sampling_is_per_window(dali):
    w = _windows(3, seed=5)
    s, _ = dali.caption(w, temperature=1.0, seeds=[11, 12, 13])
    s_again, _ = dali.caption(w[1:], temperature=1.0, seeds=[12, 13])
    assert [g.caption for g in s[1:]] == [g.caption for g in s_again]
    other, _ = dali.caption(w, temperature=1.0, seeds=[21, 22, 23])
    assert [g.caption for g in other] != [g.caption for g in s]


def test_checkpoint_round_trip_and_errors(dali_dir, tmp_path):
    d = str(dali_dir / "dali")
    assert is_dali(d) and not is_dali(str(dali_dir / "llava"))
    cfg = read_dali_config(d)
    assert cfg.llava == "../llava" and cfg.prefix_tokens == 16 and not cfg.use_prefix
    m = DaliModel(d)
    with torch.no_grad():
        m.heads.audio_projection[0].weight.add_(1.0)
        m.heads.prefix.add_(0.5)
    m.cfg.use_prefix = True
    from overheard.dali.model import save_dali
    out = tmp_path / "dali2"
    m.cfg.llava, m.cfg.clap = str(dali_dir / "llava"), str(dali_dir / "clap")  # absolute paths
    save_dali(str(out), m.cfg, m.heads)
    m2 = DaliModel(str(out))
    for k, v in m.heads.state_dict().items():
        assert torch.equal(v, m2.heads.state_dict()[k]), k
    assert m2.prefix() is not None and m2.model_id != DaliModel(d).model_id
    # weights that do not fit the models are refused with the directory named
    from safetensors.torch import save_file
    bad = tmp_path / "bad"
    save_dali(str(bad), m.cfg, m.heads)
    save_file({"audio_projection.0.weight": torch.zeros(3, 3)}, str(bad / "model.safetensors"))
    with pytest.raises(Exception, match="size mismatch|do not fit"):
        DaliModel(str(bad))
    # a pickle where weights should be is never unpickled
    pk = tmp_path / "pickled"
    save_dali(str(pk), m.cfg, m.heads)
    os.remove(pk / "model.safetensors")
    torch.save({"x": 1}, pk / "model.pt")
    with pytest.raises(ValueError, match="pickle checkpoint"):
        DaliModel(str(pk))
    (pk / "config.json").write_text(json.dumps({"kind": "decoder"}))
    with pytest.raises(ValueError, match="not a DALI checkpoint"):
        DaliModel(str(pk))


def test_bfloat16_path_runs(dali_dir):
    m = DaliModel(str(dali_dir / "dali"), dtype=torch.bfloat16)
    out, emb = m.caption(_windows(2), _frames(2))
    assert len(out) == 2 and all(isinstance(g.caption, str) for g in out)
    assert next(m.llava.model.parameters()).dtype == torch.bfloat16
    assert emb.dtype == np.float32 and np.isfinite(emb).all()


def test_check_dali_reads_headers_not_weights(dali_dir, tmp_path):
    from overheard.dali.model import check_dali, save_dali

    info = check_dali(str(dali_dir / "dali"))
    assert info["image_size"] == 32 and info["window_s"] == 10.0
    assert info["llava"].endswith("llava") and info["clap"].endswith("clap")
    # a checkpoint trained against another LLaVA (vision width 48 instead of 32) is refused
    m = DaliModel(str(dali_dir / "dali"))
    m.cfg.vision_dim = 48
    from overheard.dali.model import DaliHeads
    heads = DaliHeads(m.cfg, torch.nn.Linear(48, 64))
    heads.audio_projector = torch.nn.Module()
    heads.audio_projector.linear_1 = torch.nn.Linear(48, 64)
    heads.audio_projector.linear_2 = torch.nn.Linear(64, 64)
    m.cfg.llava, m.cfg.clap = str(dali_dir / "llava"), str(dali_dir / "clap")
    save_dali(str(tmp_path / "other"), m.cfg, heads)
    with pytest.raises(ValueError, match=r"audio_projection.2.weight has shape \(48, 48\)"):
        check_dali(str(tmp_path / "other"))
    m.cfg.llava = str(tmp_path / "nowhere")
    save_dali(str(tmp_path / "lost"), m.cfg, m.heads)
    with pytest.raises(ValueError, match="no config.json"):
        check_dali(str(tmp_path / "lost"))
