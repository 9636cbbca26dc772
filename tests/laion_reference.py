"""Reference embeddings from the laion-clap package's own code (run INSIDE .venv-laion).

Usage: ``.venv-laion/bin/python tests/laion_reference.py OUT_DIR [--amodel HTSAT-tiny|HTSAT-base]
[--n-audio 3] [--seed 0]``

Writes into OUT_DIR (one sub-directory per amodel):
- ``<amodel>/checkpoint.pt``: ``{"state_dict": {"module.<key>": tensor}, "epoch": 1}``, the layout of the
  published checkpoints (630k-audioset-best.pt, music_speech_audioset_epoch_15_esc_89.98.pt): DDP's
  ``module.`` prefix and the ``text_branch.embeddings.position_ids`` buffer, which laion-clap's
  ``load_state_dict`` deletes unconditionally (so a real file must have it).
- ``<amodel>/audio.npy``: float32 (N, 480000), the waveforms AFTER laion-clap's int16 quantisation, i.e.
  exactly what its model saw; our side embeds this array.
- ``<amodel>/audio_embed.npy``: float32 (N, 512) from ``CLAP_Module.get_audio_embedding_from_data``.
- ``<amodel>/text_ids.npy``, ``text_mask.npy``, ``text_embed.npy``: fixed token ids -> laion text embeddings.

Offline work-arounds (laion-clap 1.1.7 cannot run here unpatched, see shared/MEASURED.md):
- ``torchvision`` is imported but only used for image transforms / fusion resizing / FrozenBatchNorm2d,
  none of which a non-fusion audio forward touches; a stub module is put in ``sys.modules`` first.
- the tokenizer ``from_pretrained`` calls at import time return ``None`` (text is fed as token ids);
  ``RobertaModel.from_pretrained('roberta-base')`` returns a randomly initialised roberta-base shape model.
The audio path (torchlibrosa STFT + log-mel, HTSAT, projection) is laion-clap's real code.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _install_torchvision_stub() -> None:
    """Minimal ``torchvision`` so ``laion_clap`` imports; any real use raises."""

    class _Unavailable:
        def __init__(self, *a, **k):
            raise RuntimeError("torchvision stub: not available in the laion reference venv")

    tv = types.ModuleType("torchvision")
    tv.__path__ = []  # mark as package
    transforms = types.ModuleType("torchvision.transforms")
    for name in ["Normalize", "Compose", "RandomResizedCrop", "InterpolationMode", "ToTensor", "Resize",
                 "CenterCrop"]:
        setattr(transforms, name, _Unavailable)
    datasets = types.ModuleType("torchvision.datasets")
    ops = types.ModuleType("torchvision.ops")
    ops.__path__ = []
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = _Unavailable
    tv.transforms, tv.datasets, tv.ops, ops.misc = transforms, datasets, ops, misc
    for m in (tv, transforms, datasets, ops, misc):
        sys.modules[m.__name__] = m


TEXT_LAYERS = 12  # roberta-base; main() may lower it (--text-layers) to keep the test fast


def _patch_transformers() -> None:
    import transformers
    from transformers import RobertaConfig, RobertaModel

    def _no_tokenizer(cls, *a, **k):
        return None

    for name in ("BertTokenizer", "RobertaTokenizer", "BartTokenizer"):
        setattr(getattr(transformers, name), "from_pretrained", classmethod(_no_tokenizer))

    def _random_roberta(cls, name, *a, **k):
        assert name == "roberta-base", name
        # roberta-base's published config values (MEASURED.md): 50265 tokens, 514 positions.
        cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                            layer_norm_eps=1e-5, pad_token_id=1, num_hidden_layers=TEXT_LAYERS)
        return RobertaModel(cfg)

    RobertaModel.from_pretrained = classmethod(_random_roberta)


def _perturb_(model, seed: int) -> None:
    """Make every norm weight/bias, BatchNorm running statistic and both logit scales distinct from
    their init constants (1, 0, log(1/0.07)), so a swapped or dropped key changes the output."""
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                if mod.weight is not None:
                    mod.weight.add_(0.1 * torch.randn(mod.weight.shape, generator=g))
                    mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                # log-mel dB values sit around -100..0; stats of that order keep the net in range
                mod.running_mean.copy_(-40.0 + 5.0 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(400.0 * (0.5 + torch.rand(mod.running_var.shape, generator=g)))
        model.logit_scale_a.fill_(3.1)
        model.logit_scale_t.fill_(2.7)


def _audio(n: int, seed: int):
    """n fixed 10-s, 48-kHz mono clips: noise, a tone + harmonics, a chirp with noise bursts."""
    import numpy as np

    sr, t_len = 48000, 480000
    rng = np.random.default_rng(seed)
    t = np.arange(t_len) / sr
    clips = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            x = 0.3 * rng.standard_normal(t_len)
        elif kind == 1:
            f0 = 220.0 * (i + 1)
            x = sum(0.2 / k * np.sin(2 * np.pi * f0 * k * t) for k in range(1, 5))
        else:
            x = 0.4 * np.sin(2 * np.pi * (100 * t + 400 * t**2))
            env = (np.sin(2 * np.pi * 0.7 * t) > 0.5).astype(float)
            x = x + 0.2 * env * rng.standard_normal(t_len)
        clips.append(x.astype(np.float32))
    return np.stack(clips)


def reference(out_dir: str, amodel: str, n_audio: int, seed: int) -> str:
    """Build a seeded random laion-clap model, save its checkpoint, embed fixed audio and text."""
    import numpy as np
    import torch
    import laion_clap
    from laion_clap.clap_module.factory import load_state_dict
    from laion_clap.training.data import float32_to_int16, int16_to_float32

    import time

    t0 = time.time()
    torch.manual_seed(seed)
    np.random.seed(seed)
    out = os.path.join(out_dir, amodel)
    os.makedirs(out, exist_ok=True)
    clap = laion_clap.CLAP_Module(enable_fusion=False, amodel=amodel, device="cpu")
    _perturb_(clap.model, seed)

    sd = clap.model.state_dict()
    if "text_branch.embeddings.position_ids" not in sd:
        # transformers>=4.31 made it non-persistent; the published files (older transformers) have it.
        sd["text_branch.embeddings.position_ids"] = torch.arange(514).expand((1, -1))
    ckpt = os.path.join(out, "checkpoint.pt")
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, ckpt)
    del sd

    # Reload through laion-clap's own loader (what CLAP_Module.load_ckpt does): proves the layout is
    # what laion-clap expects -- it strips "module.", deletes position_ids (KeyError if absent), and
    # load_state_dict is strict. Zero the live weights first so the embeddings come from the file.
    with torch.no_grad():
        for p in clap.model.parameters():
            p.zero_()
    clap.model.load_state_dict(load_state_dict(ckpt, skip_params=True))

    x = _audio(n_audio, seed)
    np.save(os.path.join(out, "audio.npy"), int16_to_float32(float32_to_int16(x)))
    with torch.no_grad():
        emb = clap.get_audio_embedding_from_data(x=x, use_tensor=False)
    np.save(os.path.join(out, "audio_embed.npy"), emb.astype(np.float32))

    # text: fixed ids (bos=0 ... eos=2, pad=1 after), a short and a longer sequence
    g = torch.Generator().manual_seed(seed)
    ids = torch.ones((2, 77), dtype=torch.long)
    mask = torch.zeros((2, 77), dtype=torch.long)
    for row, n in enumerate((9, 30)):
        ids[row, 0] = 0
        ids[row, 1:n - 1] = torch.randint(5, 50265, (n - 2,), generator=g)
        ids[row, n - 1] = 2
        mask[row, :n] = 1
    with torch.no_grad():
        temb = clap.get_text_embedding(["a", "b"], tokenizer=lambda _: {"input_ids": ids.clone(),
                                                                       "attention_mask": mask.clone()})
    np.save(os.path.join(out, "text_ids.npy"), ids.numpy())
    np.save(os.path.join(out, "text_mask.npy"), mask.numpy())
    np.save(os.path.join(out, "text_embed.npy"), temb.astype(np.float32))
    print(f"laion reference {amodel}: {emb.shape} audio, {temb.shape} text -> {out} "
          f"({time.time() - t0:.1f} s)", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--amodel", nargs="+", default=["HTSAT-tiny", "HTSAT-base"],
                   choices=["HTSAT-tiny", "HTSAT-base"])
    p.add_argument("--n-audio", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-layers", type=int, default=12,
                   help="RoBERTa layers of the text branch (12 = roberta-base; the test uses 2: the "
                        "checkpoint shrinks from 635 MB to ~260 MB and the run by ~half; per-layer keys "
                        "are the same, the converter infers the count)")
    args = p.parse_args(argv)
    global TEXT_LAYERS
    TEXT_LAYERS = args.text_layers

    # transformers first: it probes torchvision with find_spec, which a stub without a spec breaks
    _patch_transformers()
    _install_torchvision_stub()
    for amodel in args.amodel:  # one process for all: the imports alone take ~9 s
        reference(args.out_dir, amodel, args.n_audio, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
