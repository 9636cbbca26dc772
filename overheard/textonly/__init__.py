"""The text-only captioning method (WSAC, arXiv 2309.12242), in one place.

A caption decoder (``overheard.decoder``) is trained on CLAP *text* embeddings only and fed CLAP
*audio* embeddings at inference. What bridges the modality gap lives here, used by both the
trainer (``training/decoder.py``, ``training/gap.py``) and the captioner (``actors/captioner.py``):

* ``gap``        training time: noise injection and embedding shift (:func:`gap.condition`), and
                 the statistics they need (noise variance, gap vector; estimate, save, load)
* ``memory``     the caption memory (text embeddings of in-domain captions) and the inference
                 strategies over it: nearest neighbour, softmax projection, top-k
* ``retrieval``  retrieval-augmented decoding: the k nearest memory captions as extra prefix
                 context (training neighbours, inference retrieval, packing)

Inference strategies (:func:`condition_audio`, what the decoder is conditioned on):
``plain`` the audio embedding as is; ``nearest`` its most similar memory embedding;
``projection`` a softmax(similarity / temperature) mix of memory embeddings; ``retrieval`` the
audio embedding plus its k nearest memory embeddings (a decoder trained with ``--retrieval-k``).
"""

from __future__ import annotations

import torch

from overheard.textonly import gap, memory, retrieval
from overheard.textonly.memory import CaptionMemory

STRATEGIES = ("plain", "nearest", "projection", "retrieval")


def condition_audio(audio_emb: torch.Tensor, strategy: str, memory_embeddings: torch.Tensor | None = None,
                    k: int = 0, temperature: float = memory.DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Audio embeddings (B, D) -> the decoder's conditioning for ``strategy``: (B, D), or packed
    (B, 1 + k, D) for ``retrieval``. Every strategy but ``plain`` needs ``memory_embeddings`` (N, D)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown decoding strategy {strategy!r}; choose from {STRATEGIES}")
    if strategy == "plain":
        return audio_emb
    if memory_embeddings is None:
        raise ValueError(f"{strategy} decoding needs a caption memory")
    if strategy == "retrieval":
        return retrieval.retrieve(audio_emb, memory_embeddings, k)
    if strategy == "nearest":
        return memory.nearest_neighbour(audio_emb, memory_embeddings)
    return memory.projection(audio_emb, memory_embeddings, temperature)


__all__ = ["STRATEGIES", "CaptionMemory", "condition_audio", "gap", "memory", "retrieval"]
