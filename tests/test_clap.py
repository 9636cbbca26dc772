"""CLAP encoder layer: laion-clap checkpoint conversion proven against laion-clap's own code, HF-format
tiny models, determinism, batching, text embeddings, refusal of untrusted checkpoints.

The reference embeddings come from tests/laion_reference.py run inside .venv-laion (scripts/setup_laion_ref.sh);
that venv is required: the test fails, never skips, without it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from overheard import clap as clap_mod  # noqa: E402
from overheard.clap import ClapEncoder, load_clap_model, save_clap_model  # noqa: E402
from overheard.clap_convert import (  # noqa: E402
    CheckpointConversionError, convert_state_dict, infer_config, load_checkpoint_state_dict)
from overheard.tiny import build_tiny_clap  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAION_PY = os.path.join(ROOT, ".venv-laion", "bin", "python")
REF_SCRIPT = os.path.join(ROOT, "tests", "laion_reference.py")
AMODELS = ("HTSAT-tiny", "HTSAT-base")
N_AUDIO = 3       # HTSAT-base in laion-clap's code is ~1-4 s per clip on 2 shared cores
TEXT_LAYERS = 2   # per-layer keys are identical to roberta-base's 12; the checkpoint shrinks ~300 MB
TOL = 1e-4


def _laion_env_key(cmd: list[str]) -> str:
    """Cache key: the reference script, its arguments and every package version in .venv-laion."""
    h = hashlib.sha256(open(REF_SCRIPT, "rb").read())
    h.update(" ".join(cmd[2:]).encode())
    site = subprocess.run([LAION_PY, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    h.update("\n".join(sorted(d for d in os.listdir(site) if d.endswith(".dist-info"))).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def laion_ref():
    """laion-clap reference outputs -> {amodel: directory with checkpoint.pt + .npy}.

    Produced by tests/laion_reference.py inside .venv-laion (~50-90 s on 2 shared cores), then kept in
    .cache/laion_ref/<key> (key: script + arguments + the venv's package versions), so reruns skip it;
    OVERHEARD_LAION_REF_FRESH=1 forces a fresh run. Our side (conversion + embedding) always runs anew.
    """
    if not os.path.exists(LAION_PY):
        pytest.fail(f"{LAION_PY} is missing: run `bash scripts/setup_laion_ref.sh` (creates the throwaway "
                    "laion-clap venv the conversion proof needs)", pytrace=False)
    cache_root = os.path.join(ROOT, ".cache", "laion_ref")
    cmd_args = ["--amodel", *AMODELS, "--n-audio", str(N_AUDIO), "--text-layers", str(TEXT_LAYERS)]
    key = _laion_env_key([LAION_PY, REF_SCRIPT, *cmd_args])
    out = os.path.join(cache_root, key)
    done = os.path.join(out, "DONE")
    if os.environ.get("OVERHEARD_LAION_REF_FRESH") == "1" or not os.path.exists(done):
        # written into a private temp dir, then renamed: parallel pytest sessions in one tree never see a
        # half-written cache; older keys (~0.9 GB of checkpoints each) are removed
        os.makedirs(cache_root, exist_ok=True)
        tmp = os.path.join(cache_root, f".tmp-{uuid.uuid4().hex}")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
        env.pop("PYTHONPATH", None)  # nothing from the main venv may leak into the reference run
        proc = subprocess.run([LAION_PY, REF_SCRIPT, tmp, *cmd_args], env=env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.fail(f"laion reference failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-5000:]}", pytrace=False)
        sys.stderr.write(proc.stdout)
        open(os.path.join(tmp, "DONE"), "w").write(key)
        for d in os.listdir(cache_root):
            if not d.startswith(".tmp-"):
                shutil.rmtree(os.path.join(cache_root, d), ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:  # a parallel session renamed its identical copy first
            out = tmp
    return {a: os.path.join(out, a) for a in AMODELS}


@pytest.mark.parametrize("amodel,embed,depths", [("HTSAT-tiny", 96, [2, 2, 6, 2]),
                                                 ("HTSAT-base", 128, [2, 2, 12, 2])])
def test_converted_laion_checkpoint_matches_laion_clap(laion_ref, amodel, embed, depths):
    d = laion_ref[amodel]
    ckpt = os.path.join(d, "checkpoint.pt")
    enc = ClapEncoder(ckpt)
    cfg = enc.model.config
    assert cfg.audio_config.patch_embeds_hidden_size == embed and list(cfg.audio_config.depths) == depths
    assert cfg.text_config.num_hidden_layers == TEXT_LAYERS and cfg.text_config.vocab_size == 50265
    assert (enc.sampling_rate, enc.window_samples, enc.embedding_dim) == (48000, 480000, 512)
    # logit scales were set to distinct values by the reference: a swap would show
    assert enc.model.logit_scale_a.item() == pytest.approx(3.1) and enc.model.logit_scale_t.item() == pytest.approx(2.7)
    sha = hashlib.sha256(open(ckpt, "rb").read()).hexdigest()[:12]
    assert enc.model_id == f"checkpoint.pt-{sha}"

    audio = np.load(os.path.join(d, "audio.npy"))
    ref = np.load(os.path.join(d, "audio_embed.npy"))
    got = enc.embed_audio(audio)
    diff = float(np.abs(got - ref).max())
    print(f"{amodel}: max |ours - laion| audio = {diff:.2e}")
    assert got.shape == ref.shape == (N_AUDIO, 512) and got.dtype == np.float32
    assert diff < TOL

    ids = torch.from_numpy(np.load(os.path.join(d, "text_ids.npy")))
    mask = torch.from_numpy(np.load(os.path.join(d, "text_mask.npy")))
    with torch.inference_mode():
        temb = enc.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.numpy()
    tdiff = float(np.abs(temb - np.load(os.path.join(d, "text_embed.npy"))).max())
    print(f"{amodel}: max |ours - laion| text = {tdiff:.2e}")
    assert tdiff < TOL

    # an original .pt has no tokenizer: embed_text says what to do instead of guessing
    with pytest.raises(RuntimeError, match="no tokenizer"):
        enc.embed_text(["a dog barks"])


def test_transformers_feature_extractor_front_end_agrees(laion_ref):
    """mel='hf' (ClapFeatureExtractor, float64 numpy) and the default torch LogMel give the same embeddings."""
    d = laion_ref["HTSAT-tiny"]
    audio = np.load(os.path.join(d, "audio.npy"))
    ref = np.load(os.path.join(d, "audio_embed.npy"))
    hf = ClapEncoder(os.path.join(d, "checkpoint.pt"), mel="hf")
    got = hf.embed_audio(audio)
    assert float(np.abs(got - ref).max()) < TOL


def test_conversion_fails_loudly_on_unmapped_and_missing_keys(laion_ref):
    sd = load_checkpoint_state_dict(os.path.join(laion_ref["HTSAT-tiny"], "checkpoint.pt"))
    config = infer_config(sd)
    sd["audio_branch.mystery.weight"] = torch.zeros(3)
    del sd["audio_branch.layers.1.blocks.0.mlp.fc1.weight"]
    with pytest.raises(CheckpointConversionError) as e:
        convert_state_dict(sd, config)
    msg = str(e.value)
    assert "audio_branch.mystery.weight" in msg
    assert "audio_model.audio_encoder.layers.1.blocks.0.intermediate.dense.weight" in msg


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(CheckpointConversionError, match="untrusted checkpoint format"):
        ClapEncoder(path)
    garbage = str(tmp_path / "garbage.pt")
    with open(garbage, "wb") as f:
        f.write(b"not a checkpoint at all")
    with pytest.raises(CheckpointConversionError, match="untrusted checkpoint format"):
        load_clap_model(garbage)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_clap(str(tmp_path_factory.mktemp("tiny") / "tiny-clap"), seed=0)


def _clips(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(480000) / 48000
    out = [0.1 * rng.standard_normal(480000) + 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) for i in range(n)]
    return np.stack(out).astype(np.float32)


def test_tiny_model_is_small_and_deterministic(tiny_dir, tmp_path):
    files = os.listdir(tiny_dir)
    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert f in files
    total = sum(os.path.getsize(os.path.join(tiny_dir, f)) for f in files)
    assert total < 1 << 20, total
    again = build_tiny_clap(str(tmp_path / "again"), seed=0)
    other = build_tiny_clap(str(tmp_path / "other"), seed=1)

    def read(d):
        return open(os.path.join(d, "model.safetensors"), "rb").read()
    assert read(again) == read(tiny_dir)
    assert read(other) != read(tiny_dir)


def test_tiny_round_trip_embeds(tiny_dir, tmp_path):
    enc = ClapEncoder(tiny_dir)
    assert (enc.sampling_rate, enc.window_samples, enc.embedding_dim) == (48000, 480000, 32)
    assert enc.model_id.startswith("tiny-clap-") and len(enc.model_id) == len("tiny-clap-") + 12
    x = _clips(5)
    a = enc.embed_audio(x)
    b = enc.embed_audio(x)
    assert a.shape == (5, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)  # no random crop for exact-length windows
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([enc.embed_audio(x[i:i + 1]) for i in range(5)])
    assert float(np.abs(a - singles).max()) < 1e-5
    assert float(np.abs(a[0] - a[1]).max()) > 1e-3  # different audio -> different embeddings
    with pytest.raises(ValueError):
        enc.embed_audio(x[:, :1000])

    # save_clap_model -> load again -> same embeddings and same model_id (weights unchanged)
    model, fe, tok = load_clap_model(tiny_dir)
    save_clap_model(model, fe, tok, str(tmp_path / "tiny-clap"))
    enc2 = ClapEncoder(str(tmp_path / "tiny-clap"))
    assert np.array_equal(enc2.embed_audio(x), a)
    assert enc2.model_id == enc.model_id

    # the transformers front end gives the same result within float32 noise
    hf = ClapEncoder(tiny_dir, mel="hf")
    assert float(np.abs(hf.embed_audio(x[:2]) - a[:2]).max()) < 1e-4


def test_tiny_fusion_model(tmp_path):
    """Fusion models (laion/clap-htsat-fused layout): a window is never longer than the model's 10 s, so
    transformers' own path is 4 identical HTK-mel channels with is_longer False; ClapEncoder must equal it."""
    d = build_tiny_clap(str(tmp_path / "fused"), seed=3, fusion=True)
    enc = ClapEncoder(d)
    assert enc.fusion
    x = _clips(2, seed=1)
    a = enc.embed_audio(x)
    assert np.array_equal(a, enc.embed_audio(x))
    model, fe, _ = load_clap_model(d)
    feats = fe(list(x.astype(np.float64)), sampling_rate=48000, truncation="fusion", return_tensors="pt")
    assert feats["input_features"].shape[1] == 4
    with torch.inference_mode():
        ref = model.get_audio_features(input_features=feats["input_features"].float(),
                                       is_longer=torch.zeros((2, 1), dtype=torch.bool)).pooler_output.numpy()
    assert float(np.abs(a - ref).max()) < 1e-4


def test_pytorch_model_bin_directory(tiny_dir, tmp_path):
    """Older HF exports ship pytorch_model.bin instead of model.safetensors: same model, same embeddings."""
    d = tmp_path / "bin-clap"
    shutil.copytree(tiny_dir, d)
    from safetensors.torch import load_file
    sd = load_file(str(d / "model.safetensors"))
    os.remove(d / "model.safetensors")
    torch.save(sd, str(d / "pytorch_model.bin"))
    x = _clips(2)
    got = ClapEncoder(str(d)).embed_audio(x)
    assert np.array_equal(got, ClapEncoder(tiny_dir).embed_audio(x))


def test_tiny_embed_text(tiny_dir):
    enc = ClapEncoder(tiny_dir, max_batch=2)
    texts = ["a dog barks in the distance", "rain", "church bells chime while a crowd murmurs loudly", "x"]
    e = enc.embed_text(texts)
    assert e.shape == (4, 32) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([enc.embed_text([t]) for t in texts])
    assert float(np.abs(e - singles).max()) < 1e-5  # padding within a batch does not change embeddings
    assert enc.embed_text([]).shape == (0, 32)


def test_encoder_localizes_its_path(tiny_dir, monkeypatch):
    seen = []
    real = clap_mod.storage.localize

    def spy(uri, *a, **k):
        seen.append(uri)
        return real(uri, *a, **k)
    monkeypatch.setattr(clap_mod.storage, "localize", spy)
    ClapEncoder(tiny_dir)
    assert seen and seen[0] == tiny_dir


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("slaney", [True, False])
def test_logmel_cpu_path_equals_stft_path_and_the_extractor(slaney):
    """LogMel's CPU path (scipy rfft row by row) and its GPU path (batched torch.stft, run here on
    the CPU) give the same dB mel as ClapFeatureExtractor's float64 numpy, for both filterbanks,
    on a window that is not a multiple of the hop (frame count T // hop + 1)."""
    from transformers import ClapFeatureExtractor
    from transformers.audio_utils import spectrogram, window_function

    from overheard.clap import LogMel

    fe = ClapFeatureExtractor()
    lm = LogMel(fe, slaney=slaney)
    x = _clips(3, seed=4)[:, :480000 - 123]
    x[1] *= 0.0  # silence hits the 1e-10 floor: -100 dB on both paths
    cpu = lm(torch.from_numpy(x))
    stft = (10.0 * torch.log10(torch.clamp(lm._stft_mel(torch.from_numpy(x)), min=1e-10))).unsqueeze(1)
    assert cpu.shape == stft.shape == (3, 1, (480000 - 123) // 480 + 1, 64)
    assert cpu.dtype == torch.float32
    assert float((cpu - stft).abs().max()) < 1e-3  # dB; float32 FFTs of different libraries
    assert float(cpu[1].max()) == pytest.approx(-100.0)
    filters = fe.mel_filters_slaney if slaney else fe.mel_filters
    for i in (0, 2):
        ref = spectrogram(x[i].astype(np.float64), window_function(fe.fft_window_size, "hann"),
                          frame_length=fe.fft_window_size, hop_length=fe.hop_length, power=2.0,
                          mel_filters=filters, log_mel="dB").T
        assert float(np.abs(cpu[i, 0].numpy() - ref).max()) < 2e-3
