"""Retrieval-augmented caption decoding: the k nearest memory captions as extra prefix context.

A :class:`~overheard.decoder.RetrievalCaptionDecoder` builds its prefix from a *packed*
conditioning tensor (B, 1 + k, D), made here::

    slot 0      the query embedding (training: the caption's own text embedding, after noise/shift;
                inference: the CLAP audio embedding)
    slots 1..k  the k nearest memory caption embeddings (training: nearest OTHER captions of the
                corpus, the caption itself and identical strings excluded; inference: the audio
                embedding's k nearest memory embeddings), most similar first

k is stored in the decoder's config.json (``extra.retrieval.k``); ``overheard.decoder.load_decoder``
loads either kind of decoder directory.
"""

from __future__ import annotations

import torch

from overheard.textonly import memory as mem


def pack(query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """(B, D) query + (B, k, D) neighbours -> (B, 1 + k, D)."""
    return torch.cat([query.unsqueeze(1), neighbours.to(query.dtype)], dim=1)


def training_neighbours(embeddings: torch.Tensor, captions: list[str], k: int,
                        chunk_size: int = mem.DEFAULT_CHUNK) -> torch.Tensor:
    """(N, k) indices of each caption's k most similar OTHER captions (itself and identical
    strings excluded), most similar first; ties -> lower index.  ValueError when fewer than k
    distinct other captions exist."""
    n = embeddings.shape[0]
    if n != len(captions):
        raise ValueError(f"{n} embeddings but {len(captions)} captions")
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    if len(counts) - 1 < k:
        raise ValueError(f"retrieval k={k} needs more than {k} distinct captions, got {len(counts)}")
    extra = max(counts.values())  # itself + identical copies can take this many top slots
    emb = embeddings.float()
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, 1024):
        idx, _ = mem.top_k(emb[start:start + 1024], emb, k + extra, chunk_size)
        for r, row in enumerate(idx.tolist()):
            me = captions[start + r]
            keep = [j for j in row if captions[j] != me][:k]
            if len(keep) < k:  # many near-identical strings crowd the top: search the whole memory
                full, _ = mem.top_k(emb[start + r:start + r + 1], emb, n, chunk_size)
                keep = [j for j in full[0].tolist() if captions[j] != me][:k]
            out[start + r] = torch.tensor(keep)
    return out


def retrieve(audio_emb: torch.Tensor, memory: torch.Tensor, k: int,
             chunk_size: int = mem.DEFAULT_CHUNK) -> torch.Tensor:
    """Inference conditioning: audio (B, D) + its k nearest memory rows -> packed (B, 1 + k, D)."""
    idx, _ = mem.top_k(audio_emb, memory, k, chunk_size)
    return pack(audio_emb.to(memory.dtype), memory[idx])


__all__ = ["pack", "training_neighbours", "retrieve"]
