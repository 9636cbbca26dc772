"""Retrieval-augmented caption decoding: the k nearest memory captions as extra prefix context.

A :class:`RetrievalCaptionDecoder` is a :class:`~overheard.decoder.CaptionDecoder` whose prefix is
built from a *packed* conditioning tensor (B, 1 + k, D)::

    slot 0      the query embedding (training: the caption's own text embedding, after noise/shift;
                inference: the CLAP audio embedding)
    slots 1..k  the k nearest memory caption embeddings (training: nearest OTHER captions of the
                corpus, the caption itself and identical strings excluded; inference: the audio
                embedding's k nearest memory embeddings), most similar first

The same mapping network maps every slot to ``prefix_length`` vectors; a learned per-slot vector
(zero at initialisation) is added so the LM can tell the query from the neighbours; the (1 + k) * P
prefix vectors precede <s> and the caption.  The GPT-2 position table grows to
(1 + k) * P + 1 + max_caption_tokens.  k is stored in config.json's ``extra.retrieval.k``;
:func:`load_model` loads either kind of decoder directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from overheard.checkpoint import safetensors_shapes
from overheard import memory as mem
from overheard.decoder import (CaptionDecoder, DecoderConfig, _TIED_KEY, WEIGHTS_NAME, load_decoder,
                               read_config, save_decoder)


class _RoomyConfig(DecoderConfig):
    """DecoderConfig whose position table also holds k neighbour prefixes (k is not a saved field)."""

    def __init__(self, base: DecoderConfig, k: int):
        super().__init__(**dataclasses.asdict(base))
        self._k = int(k)

    @property
    def n_positions(self) -> int:
        return (1 + self._k) * self.prefix_length + 1 + self.max_caption_tokens


class RetrievalCaptionDecoder(CaptionDecoder):
    def __init__(self, config: DecoderConfig, k: int, tokenizer=None):
        if int(k) < 1:
            raise ValueError(f"retrieval k must be >= 1, got {k}")
        super().__init__(_RoomyConfig(config, k), tokenizer)
        self.k = int(k)
        self.slot = nn.Parameter(torch.zeros(1 + self.k, config.n_embd))

    def prefix(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, 1 + k, D) -> (B, (1 + k) * P, n_embd)."""
        d = self.config.embedding_dim
        if packed.dim() != 3 or packed.shape[1] != 1 + self.k or packed.shape[2] != d:
            raise ValueError(f"retrieval decoder needs (B, {1 + self.k}, {d}) query + neighbours, "
                             f"got {tuple(packed.shape)}")
        b, g, _ = packed.shape
        w = self.lm.transformer.wte.weight
        h = self.mapper(packed.reshape(b * g, d).to(device=w.device, dtype=w.dtype))
        h = h.view(b, g, self.config.prefix_length, -1) + self.slot[None, :, None, :]
        return h.reshape(b, g * self.config.prefix_length, -1)


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


def save_model(model: CaptionDecoder, tokenizer, directory, extra: dict | None = None) -> Path:
    """save_decoder, recording ``extra.retrieval.k`` for a retrieval decoder."""
    extra = dict(extra if extra is not None else model.extra)
    if isinstance(model, RetrievalCaptionDecoder):
        extra["retrieval"] = {"k": model.k}
    return save_decoder(model, tokenizer, directory, extra=extra)


def retrieval_k(directory) -> int:
    """k of a decoder directory (0: a plain decoder)."""
    _, extra = read_config(directory)
    return int((extra.get("retrieval") or {}).get("k") or 0)


def load_model(directory, device: str | torch.device = "cpu"):
    """Load a plain or retrieval decoder directory -> (model in eval mode, tokenizer)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from overheard.tokenizer import load_tokenizer

    k = retrieval_k(directory)
    if k == 0:
        return load_decoder(directory, device)
    cfg, extra = read_config(directory)
    d = Path(directory)
    with torch.device("meta"):  # shapes first, without memory (see decoder.load_decoder)
        expected = {k_: tuple(v.shape) for k_, v in
                    RetrievalCaptionDecoder(cfg, k).state_dict().items() if k_ != _TIED_KEY}
    try:
        found = safetensors_shapes([d / WEIGHTS_NAME])
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{d / WEIGHTS_NAME}: cannot read safetensors weights ({e})") from None
    if expected != found:
        bad = sorted(set(expected) ^ set(found)) or sorted(
            k_ for k_ in expected if expected[k_] != found.get(k_))
        raise ValueError(f"{d / WEIGHTS_NAME}: does not match config.json (retrieval k={k}): {bad[:5]}")
    model = RetrievalCaptionDecoder(cfg, k)
    try:
        state = load_file(str(d / WEIGHTS_NAME))
    except (SafetensorError, FileNotFoundError) as e:
        raise ValueError(f"{d / WEIGHTS_NAME}: cannot read safetensors weights ({e})") from None
    model.load_state_dict({k_: v.float() for k_, v in state.items()}, strict=False)
    model.lm.tie_weights()
    tokenizer = load_tokenizer(str(d))
    model.tokenizer, model.extra = tokenizer, extra
    return model.to(device).eval(), tokenizer


__all__ = ["RetrievalCaptionDecoder", "pack", "training_neighbours", "retrieve", "save_model",
           "load_model", "retrieval_k"]
