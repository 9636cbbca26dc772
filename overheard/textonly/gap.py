"""The modality gap of the text-only method (WSAC §3.1): its statistics and the training-time
conditioning that bridges it.

The decoder is trained on CLAP *text* embeddings and fed CLAP *audio* embeddings at inference;
the two sit apart on the sphere. Two training-time remedies, applied to L2-normalised text
embeddings ``t`` by :func:`condition` (``gap_mode``):

    shift   z <- normalise(normalise(t) + gap)          (:func:`shift`; gap vector below)
    noise   z <- z + N(0, sigma^2 I), then re-normalise  (``renormalise``, the seed's order)
    both    shift, then noise;      none   z = normalise(t)

Statistics (embeddings L2-normalised; estimated by ``overheard estimate-gap``, ``training/gap.py``):

* noise variance  sigma^2 = mean_d Var_pairs(a_d - t_d)  (unbiased variance over paired
  (audio, caption) rows, per dimension, averaged over dimensions; the seed estimates it from 50
  WavCaps pairs -> 0.013)
* gap vector      mean(audio embeddings) - mean(text embeddings)  (sets need not be paired)

On disk: ``X.json`` (noise_variance, gap_vector, gap_norm, counts, provenance) and
``X.safetensors`` beside it ({"gap_vector": (D,), "noise_variance": ()}); :func:`load_gap` reads
either, local or s3://.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from overheard import storage

GAP_MODES = ("none", "noise", "shift", "both")


# ----------------------------------------------------------------------------- conditioning
def shift(emb: torch.Tensor, gap_vector: torch.Tensor | Sequence[float], renormalise: bool = True
          ) -> torch.Tensor:
    """Embedding shift: (B, D) + gap (D,) -> (B, D), re-normalised like the seed (unless told not to)."""
    gap = torch.as_tensor(gap_vector, dtype=emb.dtype, device=emb.device)
    if gap.shape != emb.shape[-1:]:
        raise ValueError(f"gap vector has shape {tuple(gap.shape)}, embeddings have dim {emb.shape[-1]}")
    out = emb + gap
    return F.normalize(out, dim=-1) if renormalise else out


def condition(emb: torch.Tensor, gap_mode: str, noise_variance: float, gap=None, renormalise: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time modality-gap handling of text embeddings (B, D) -> float32 (B, D) (module doc).
    ``generator`` draws the noise on the CPU (seeded per epoch and rank by the trainer, so a
    resumed run draws the numbers an uninterrupted one would)."""
    if gap_mode not in GAP_MODES:
        raise ValueError(f"unknown gap mode {gap_mode!r}; expected one of {GAP_MODES}")
    z = F.normalize(emb.float(), dim=-1)
    if gap_mode in ("shift", "both"):
        z = shift(z, gap)
    if gap_mode in ("noise", "both") and noise_variance > 0:
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        z = z + noise * math.sqrt(noise_variance)
        if renormalise:
            z = F.normalize(z, dim=-1)
    return z


# ----------------------------------------------------------------------------- statistics
def _norm(x) -> torch.Tensor:
    return F.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float64), dim=-1)


def noise_variance(audio_emb, text_emb) -> float:
    """mean over dimensions of the unbiased variance over pairs of (a - t); rows are pairs."""
    a, t = _norm(audio_emb), _norm(text_emb)
    if a.shape != t.shape or a.dim() != 2:
        raise ValueError(f"paired embeddings must have equal (N, D) shapes, got {tuple(a.shape)} "
                         f"and {tuple(t.shape)}")
    if a.shape[0] < 2:
        raise ValueError("need at least 2 pairs to estimate a variance")
    return float((a - t).var(dim=0, unbiased=True).mean())


def gap_vector(audio_emb, text_emb) -> np.ndarray:
    """mean(normalised audio) - mean(normalised text), float32 (D,); sets need not be paired."""
    return (_norm(audio_emb).mean(0) - _norm(text_emb).mean(0)).float().numpy()


def estimate(paired_audio=None, paired_text=None, audio=None, text=None) -> dict:
    """Statistics from paired rows (noise variance + gap) and optional unpaired extra sets (gap)."""
    d: dict = {}
    parts_a = [x for x in (paired_audio, audio) if x is not None and len(x)]
    parts_t = [x for x in (paired_text, text) if x is not None and len(x)]
    if not parts_a or not parts_t:
        raise ValueError("need audio and text embeddings (paired, or unpaired sets of each)")
    if paired_audio is not None and len(paired_audio) >= 2:
        d["noise_variance"] = noise_variance(paired_audio, paired_text)
        d["n_pairs"] = int(len(paired_audio))
    else:
        d["noise_variance"] = None
        d["n_pairs"] = int(len(paired_audio)) if paired_audio is not None else 0
    all_a = np.concatenate([np.asarray(x, np.float32) for x in parts_a])
    all_t = np.concatenate([np.asarray(x, np.float32) for x in parts_t])
    g = gap_vector(all_a, all_t)
    d.update(gap_vector=[float(v) for v in g], gap_norm=float(np.linalg.norm(g)),
             n_audio=int(len(all_a)), n_text=int(len(all_t)), dim=int(g.shape[0]))
    return d


# ----------------------------------------------------------------------------- files
def save_gap(stats: dict, out: str) -> tuple[str, str]:
    """Write ``out`` (.json) and the .safetensors beside it; returns both URIs."""
    from overheard.checkpoint import save_weights

    if not out.endswith(".json"):
        out = out + ".json"
    st = out[: -len(".json")] + ".safetensors"
    storage.write_bytes_atomic(out, json.dumps(stats, indent=2).encode())
    tensors = {"gap_vector": torch.tensor(stats["gap_vector"], dtype=torch.float32)}
    if stats.get("noise_variance") is not None:
        tensors["noise_variance"] = torch.tensor(float(stats["noise_variance"]), dtype=torch.float32)
    save_weights(tensors, st, metadata={"format": "overheard.gap"})
    return out, st


def load_gap(uri: str) -> dict:
    """Read a file written by :func:`save_gap` (.json or .safetensors) ->
    {"gap_vector": float32 np (D,), "noise_variance": float | None, ...}."""
    raw = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as st_load

        t = st_load(raw)
        nv = t.get("noise_variance")
        return {"gap_vector": t["gap_vector"].float().numpy(),
                "noise_variance": None if nv is None else float(nv)}
    d = json.loads(raw)
    if "gap_vector" not in d:
        raise ValueError(f"{uri}: no gap_vector")
    d["gap_vector"] = np.asarray(d["gap_vector"], dtype=np.float32)
    return d


__all__ = ["GAP_MODES", "condition", "estimate", "gap_vector", "load_gap", "noise_variance", "save_gap",
           "shift"]
