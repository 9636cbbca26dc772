"""CLAP's contrastive objective and the retrieval metrics it is judged by (numpy / torch, no Ray).

:func:`clip_loss` (symmetric InfoNCE with CLAP's two logit scales), :func:`embed_pairs` (audio and
caption embeddings of a ``ClapModel``), :func:`retrieval_metrics` (audio<->text recall at 1/5/10
with their chance levels, and modality-gap statistics). ``training/clap_contrastive.py`` trains
with them.
"""

from __future__ import annotations

import math

import numpy as np


def clip_loss(a, t, scale_a, scale_t):
    """Symmetric InfoNCE as CLAP: CE(scale_a * A T^T) and CE(scale_t * T A^T), matched on the diagonal."""
    import torch.nn.functional as F
    import torch

    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(scale_a * a @ t.T, labels) + F.cross_entropy(scale_t * t @ a.T, labels))


def embed_pairs(model, feats, captions_flat, tokenizer, device, batch: int = 32):
    """(audio (N, D), text (M, D)) embeddings of a ``ClapModel`` (or its DDP wrapper) in eval mode:
    log-mel ``feats`` (N, T, F) float16/32 and captions (lower-cased: the tokenizer's BPE is)."""
    import torch

    m = model.module if hasattr(model, "module") else model
    was = m.training
    m.eval()
    a, t = [], []
    with torch.no_grad():
        for i in range(0, len(feats), batch):
            x = torch.from_numpy(np.asarray(feats[i:i + batch], dtype=np.float32)).unsqueeze(1).to(device)
            a.append(m.get_audio_features(input_features=x).pooler_output.cpu().numpy())
        for i in range(0, len(captions_flat), 128):
            tok = tokenizer([c.lower() for c in captions_flat[i:i + 128]], padding=True, truncation=True,
                            return_tensors="pt").to(device)
            t.append(m.get_text_features(input_ids=tok["input_ids"],
                                         attention_mask=tok["attention_mask"]).pooler_output.cpu().numpy())
    m.train(was)
    return np.concatenate(a), np.concatenate(t)


def _chance_a2t(n_audio: int, per: int, k: int) -> float:
    total = n_audio * per
    return 1.0 - math.comb(total - per, k) / math.comb(total, k)


def retrieval_metrics(audio, text, per: int = 5, source_sets: list | None = None) -> dict:
    """Audio->text / text->audio recall and modality-gap statistics of L2-normalised embeddings.

    ``audio`` (N, D), ``text`` (N*per, D) with captions of clip i at rows i*per..i*per+per-1.
    a2t R@k: an own caption among the k nearest captions; t2a R@k: own clip among k nearest clips.
    ``a2t_sources_R@1``: the nearest caption describes a clip with the same set of sources.
    Gap: ``gap_norm`` = |mean(audio) - mean(text)|, ``cos_paired`` = mean cosine of a clip with its
    captions, ``cos_unpaired`` = mean cosine with other clips' captions.
    """
    audio = np.asarray(audio, dtype=np.float64)
    text = np.asarray(text, dtype=np.float64)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True) + 1e-12
    text /= np.linalg.norm(text, axis=1, keepdims=True) + 1e-12
    n = audio.shape[0]
    owner = np.repeat(np.arange(n), per)
    sim = audio @ text.T                                   # (N, N*per)
    order = np.argsort(-sim, axis=1, kind="stable")
    own = owner[order] == np.arange(n)[:, None]
    first = own.argmax(axis=1)                             # rank of the best own caption
    out: dict = {"n_audio": n, "n_text": n * per}
    for k in (1, 5, 10):
        out[f"a2t_R@{k}"] = float(np.mean(first < k))
        out[f"a2t_R@{k}_chance"] = _chance_a2t(n, per, k)
    rank_t = np.argsort(-sim.T, axis=1, kind="stable")
    first_t = (rank_t == owner[:, None]).argmax(axis=1)
    for k in (1, 5, 10):
        out[f"t2a_R@{k}"] = float(np.mean(first_t < k))
        out[f"t2a_R@{k}_chance"] = min(1.0, k / n)
    if source_sets is not None:
        top = owner[order[:, 0]]
        out["a2t_sources_R@1"] = float(np.mean([source_sets[i] == source_sets[j] for i, j in enumerate(top)]))
        sets = [frozenset(s) for s in source_sets]
        freq = {s: sets.count(s) / n for s in set(sets)}
        out["a2t_sources_R@1_chance"] = float(sum(f * f for f in freq.values()))
    paired = sim[owner, np.arange(n * per)]
    out["cos_paired"] = float(paired.mean())
    out["cos_unpaired"] = float((sim.sum() - paired.sum()) / (sim.size - paired.size))
    out["gap_norm"] = float(np.linalg.norm(audio.mean(0) - text.mean(0)))
    out["cos_audio_audio"] = float(((audio @ audio.T).sum() - n) / (n * n - n))
    out["cos_text_text"] = float(((text @ text.T).sum() - n * per) / ((n * per) ** 2 - n * per))
    return out
