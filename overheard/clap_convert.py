"""Convert an original LAION-CLAP checkpoint (laion-clap package, ``.pt``) into a transformers ClapModel.

Input: the published files' layout, e.g. ``630k-audioset-best.pt`` (HTSAT-tiny) and
``music_speech_audioset_epoch_15_esc_89.98.pt`` (HTSAT-base): ``{"state_dict": {"module.<key>": tensor},
...}`` (DDP prefix ``module.``; other top-level entries such as ``epoch``/``optimizer`` are ignored), or a
bare state_dict. The text branch must be RoBERTa (``text_branch.*`` in transformers' RobertaModel naming).

Output: ``(ClapConfig, state_dict)`` whose keys are exactly ``ClapModel(config).state_dict()``'s
(``convert_laion_checkpoint``), or a loaded model (``load_laion_checkpoint``).

Loading is ``torch.load(..., weights_only=True)`` only: a file that needs arbitrary unpickling is refused
("untrusted checkpoint format"), never executed.
"""

from __future__ import annotations

import re

import torch
from transformers import ClapConfig, ClapModel

# Keys in a laion-clap checkpoint that have no counterpart in transformers' ClapModel, on purpose:
IGNORED_PREFIXES = (
    "audio_branch.spectrogram_extractor.",  # STFT as frozen conv weights: the mel runs outside the model
    "audio_branch.logmel_extractor.",        # mel filterbank (checked against ours, see _check_melbank)
    "audio_branch.tscam_conv.",              # AudioSet 527-class head (clipwise output), unused for embeddings
    "audio_branch.head.",
    "audio_transform.",                      # MLPs used only by the training loss (linear-probe features)
    "text_transform.",
)
IGNORED_KEYS = ("text_branch.embeddings.position_ids",)  # buffer arange(514), rebuilt by ClapTextEmbeddings
_IGNORED_RE = re.compile(r"^audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask$")  # shifted-window mask, recomputed

# Renames inside a Swin block: laion (timm-style) -> transformers (Swin-style)
_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "attn.relative_position_index": "attention.self.relative_position_index",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


class CheckpointConversionError(ValueError):
    """The checkpoint is not a laion-clap CLAP state_dict we can map completely."""


def load_checkpoint_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a laion-clap ``.pt`` with ``weights_only=True``; unwrap ``state_dict``, strip ``module.``.

    Returns the model's state_dict with laion-clap's own key names (``audio_branch.*``, ``text_branch.*``...).
    Raises CheckpointConversionError("untrusted checkpoint format ...") if the file needs full unpickling.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, or anything the restricted unpickler refuses
        raise CheckpointConversionError(
            f"untrusted checkpoint format: {path!r} cannot be loaded with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Only plain tensor "
            "state_dicts are accepted; arbitrary pickles are never executed. Re-save the checkpoint as "
            "{'state_dict': model.state_dict()} or convert it to safetensors."
        ) from e
    sd = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointConversionError(f"{path!r}: no tensor state_dict found (top-level type {type(obj).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def infer_config(sd: dict[str, torch.Tensor]) -> ClapConfig:
    """ClapConfig from tensor shapes of a laion-clap state_dict (prefix-free keys).

    HTSAT-tiny: patch embed 96, depths [2,2,6,2]; HTSAT-base: 128, [2,2,12,2]; heads from the relative
    position bias tables, window from their size ((2w-1)^2 rows). Text: RoBERTa sizes from embeddings/layers;
    heads are not visible in shapes, so hidden/64 (roberta-base: 768/64 = 12).
    """
    if "audio_branch.patch_embed.proj.weight" not in sd:
        raise CheckpointConversionError(
            "not an HTSAT laion-clap checkpoint (no audio_branch.patch_embed.proj.weight); PANN audio "
            "branches are not supported by transformers' ClapModel"
        )
    if "text_branch.embeddings.word_embeddings.weight" not in sd:
        raise CheckpointConversionError("text branch is not RoBERTa/BERT-style (no text_branch.embeddings.*)")
    if any(k.startswith("text_branch.shared.") or k.startswith("text_branch.encoder.layers.") for k in sd):
        raise CheckpointConversionError("BART text branches are not supported (transformers ClapModel is RoBERTa)")

    proj = sd["audio_branch.patch_embed.proj.weight"]  # (embed, in_ch, p, p)
    embed = proj.shape[0]
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"audio_branch\.layers\.(\d+)\.", k))})
    depths, heads = [], []
    window = None
    for s in stages:
        blocks = sorted({int(m.group(1)) for k in sd
                         if (m := re.match(rf"audio_branch\.layers\.{s}\.blocks\.(\d+)\.", k))})
        depths.append(len(blocks))
        table = sd[f"audio_branch.layers.{s}.blocks.0.attn.relative_position_bias_table"]
        heads.append(table.shape[1])
        w = (int(round(table.shape[0] ** 0.5)) + 1) // 2
        if window is not None and w != window:
            raise CheckpointConversionError(f"stage {s} window {w} != {window}")
        window = w
    hidden = sd["audio_branch.norm.weight"].shape[0]
    if hidden != embed * 2 ** (len(depths) - 1):
        raise CheckpointConversionError(f"audio norm width {hidden} != {embed} * 2^{len(depths) - 1}")
    fc1 = sd["audio_branch.layers.0.blocks.0.mlp.fc1.weight"]
    mel_bins = sd["audio_branch.bn0.weight"].shape[0]
    fusion = "audio_branch.patch_embed.mel_conv2d.weight" in sd
    if fusion and "audio_branch.patch_embed.fusion_model.local_att.0.weight" not in sd:
        raise CheckpointConversionError("fusion checkpoint with a fusion type other than aff_2d is not supported")
    audio_cfg = dict(
        patch_embeds_hidden_size=embed,
        depths=depths,
        num_attention_heads=heads,
        window_size=window,
        hidden_size=hidden,
        num_mel_bins=mel_bins,
        spec_size=256,  # HTSAT's 1024x64 mel -> 256x256 image (all published configs)
        patch_size=proj.shape[-1],
        patch_stride=(4, 4),
        patch_embed_input_channels=proj.shape[1],
        mlp_ratio=fc1.shape[0] / fc1.shape[1],
        enable_fusion=fusion,
        fusion_type="aff_2d" if fusion else None,
        layer_norm_eps=1e-5,  # torch.nn.LayerNorm default used by HTSAT
    )
    if fusion:
        audio_cfg["aff_block_r"] = embed // sd["audio_branch.patch_embed.fusion_model.local_att.0.weight"].shape[0]

    emb = sd["text_branch.embeddings.word_embeddings.weight"]
    n_text_layers = len({int(m.group(1)) for k in sd
                         if (m := re.match(r"text_branch\.encoder\.layer\.(\d+)\.", k))})
    t_hidden = emb.shape[1]
    text_cfg = dict(
        vocab_size=emb.shape[0],
        hidden_size=t_hidden,
        num_hidden_layers=n_text_layers,
        num_attention_heads=max(1, t_hidden // 64),
        intermediate_size=sd["text_branch.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd["text_branch.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd["text_branch.embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=1e-5,  # roberta-base's value (ClapTextConfig defaults to 1e-12)
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    projection_dim = sd["audio_projection.0.weight"].shape[0]
    return ClapConfig(text_config=text_cfg, audio_config=audio_cfg, projection_dim=projection_dim)


def map_key(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """One laion-clap key -> {transformers key: tensor} (qkv splits into three), None if deliberately
    ignored; raises KeyError if unknown."""
    if key.startswith(IGNORED_PREFIXES) or key in IGNORED_KEYS or _IGNORED_RE.match(key):
        return None
    if key in ("logit_scale_a", "logit_scale_t"):
        return {key: tensor}
    m = re.match(r"^(audio|text)_projection\.(0|2)\.(weight|bias)$", key)
    if m:
        return {f"{m.group(1)}_projection.linear{1 if m.group(2) == '0' else 2}.{m.group(3)}": tensor}
    if key.startswith("text_branch."):
        return {"text_model." + key[len("text_branch."):]: tensor}
    if key.startswith("audio_branch."):
        rest = key[len("audio_branch."):]
        enc = "audio_model.audio_encoder."
        if rest.startswith("bn0."):
            return {enc + "batch_norm." + rest[len("bn0."):]: tensor}
        if rest.startswith("patch_embed.") or rest.startswith("norm."):
            return {enc + rest: tensor}
        m = re.match(r"^layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", rest)
        if m:
            return {enc + rest: tensor}
        m = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", rest)
        if m:
            prefix = f"{enc}layers.{m.group(1)}.blocks.{m.group(2)}."
            sub = m.group(3)
            if sub in ("attn.qkv.weight", "attn.qkv.bias"):
                # timm packs q, k, v along dim 0 in that order: (3*dim, dim) / (3*dim,)
                q, k, v = tensor.chunk(3, dim=0)
                kind = sub.rsplit(".", 1)[1]
                return {f"{prefix}attention.self.{n}.{kind}": t.contiguous()
                        for n, t in (("query", q), ("key", k), ("value", v))}
            for old, new in _BLOCK_RENAMES.items():
                if sub.startswith(old + ".") or sub == old:
                    return {prefix + new + sub[len(old):]: tensor}
    raise KeyError(key)


def convert_state_dict(sd: dict[str, torch.Tensor], config: ClapConfig) -> dict[str, torch.Tensor]:
    """laion-clap state_dict (prefix-free) -> ClapModel state_dict; every key accounted for, or raises
    CheckpointConversionError listing the unmapped source keys and the missing/mis-shaped target keys."""
    with torch.device("meta"):
        target = ClapModel(config).state_dict()  # shapes only, no allocation
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for k, v in sd.items():
        try:
            mapped = map_key(k, v)
        except KeyError:
            unmapped.append(k)
            continue
        if mapped:
            out.update(mapped)
    # buffers transformers builds itself and laion does not store
    for k, t in target.items():
        if k not in out and k.endswith(("embeddings.token_type_ids", "embeddings.position_ids")):
            if k.endswith("token_type_ids"):
                out[k] = torch.zeros(t.shape, dtype=t.dtype)
            else:
                out[k] = torch.arange(t.shape[-1], dtype=t.dtype).expand(t.shape).clone()
    missing = sorted(set(target) - set(out))
    unexpected = sorted(set(out) - set(target))
    bad_shape = sorted(k for k in set(out) & set(target) if tuple(out[k].shape) != tuple(target[k].shape))
    if unmapped or missing or unexpected or bad_shape:
        def show(xs):
            return ", ".join(xs[:20]) + (f" ... (+{len(xs) - 20})" if len(xs) > 20 else "")
        raise CheckpointConversionError(
            "laion-clap -> ClapModel conversion incomplete:"
            + (f"\n  unmapped checkpoint keys ({len(unmapped)}): {show(unmapped)}" if unmapped else "")
            + (f"\n  missing model keys ({len(missing)}): {show(missing)}" if missing else "")
            + (f"\n  unexpected mapped keys ({len(unexpected)}): {show(unexpected)}" if unexpected else "")
            + (f"\n  shape mismatches: " + show([f"{k} {tuple(out[k].shape)} vs {tuple(target[k].shape)}"
                                                for k in bad_shape]) if bad_shape else "")
        )
    return {k: out[k].to(target[k].dtype) if out[k].is_floating_point() else out[k] for k in target}


def _check_melbank(sd: dict[str, torch.Tensor], sampling_rate: int, fmin: float, fmax: float) -> None:
    """The checkpoint carries its mel filterbank (torchlibrosa ``melW``, (n_fft/2+1, mels), librosa slaney);
    refuse a file whose bank differs from the one our feature extractor will use."""
    mel_w = sd.get("audio_branch.logmel_extractor.melW")
    if mel_w is None:
        return
    from transformers.audio_utils import mel_filter_bank

    ours = mel_filter_bank(num_frequency_bins=mel_w.shape[0], num_mel_filters=mel_w.shape[1],
                           min_frequency=fmin, max_frequency=fmax, sampling_rate=sampling_rate,
                           norm="slaney", mel_scale="slaney")
    err = float((torch.from_numpy(ours).float() - mel_w.float()).abs().max())
    if err > 1e-5 * float(mel_w.abs().max()):
        raise CheckpointConversionError(
            f"checkpoint mel filterbank differs from slaney {fmin}-{fmax} Hz at {sampling_rate} Hz "
            f"(max abs diff {err:.3g}); unsupported audio front end")


def convert_laion_checkpoint(path: str) -> tuple[ClapConfig, dict[str, torch.Tensor]]:
    """``.pt`` path -> (ClapConfig, ClapModel state_dict). See module docstring."""
    sd = load_checkpoint_state_dict(path)
    config = infer_config(sd)
    n_fft = 2 * (sd["audio_branch.logmel_extractor.melW"].shape[0] - 1) if (
        "audio_branch.logmel_extractor.melW" in sd) else 1024
    if n_fft != 1024:
        raise CheckpointConversionError(f"STFT size {n_fft} != 1024 (HTSAT configs)")
    _check_melbank(sd, 48000, 50.0, 14000.0)  # every HTSAT config: 48 kHz, fmin 50, fmax 14000
    return config, convert_state_dict(sd, config)


def load_laion_checkpoint(path: str) -> ClapModel:
    """``.pt`` path -> ClapModel in eval mode with the converted weights (strict load)."""
    config, sd = convert_laion_checkpoint(path)
    model = ClapModel(config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


__all__ = ["CheckpointConversionError", "convert_laion_checkpoint", "load_laion_checkpoint",
           "load_checkpoint_state_dict", "infer_config", "convert_state_dict"]
