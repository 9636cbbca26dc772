"""Inference-time modality-gap strategies over a memory of caption text embeddings (WSAC §3.2).

A *memory* is ``M`` (N, D) float32, rows L2-normalised CLAP text embeddings of in-domain
captions, plus the N caption strings.  Audio embeddings ``A`` (B, D), L2-normalised, are moved
onto the text manifold before decoding:

* nearest neighbour:  a_b -> m_{argmax_i <a_b, m_i>}                (ties -> lowest i)
* projection:         a_b -> normalise( sum_i softmax_i(<a_b, m_i> / T) m_i ),  T = 0.01
  (the seed scales similarities by 100 before the softmax, i.e. T = 1/100, as in DeCap, and
  re-normalises the mix)
* top-k retrieval:    indices/scores of the k most similar captions (retrieval-augmented decoding)

(The training-time embedding shift and noise live in ``overheard.textonly.gap``.)

Everything is batched, deterministic and chunked over N: at most a (B, chunk_size) similarity
block exists at a time (B=32, chunk 65 536 -> 8 MiB), so a 1 M-caption memory never builds a
B x N matrix; projection keeps a running max / sum-of-exp (log-sum-exp) and a running weighted
sum, nearest neighbour and top-k keep running bests.

On disk (a directory)::

    memory.safetensors      {"embeddings": float32 (N, D)}; metadata count, dim
    memory_captions.jsonl   N lines, one JSON string each, row i <-> caption i
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from overheard.topk import topk_lowest_index

DEFAULT_TEMPERATURE = 0.01   # seed: softmax(100 * cosine)
DEFAULT_CHUNK = 65_536       # memory rows per similarity block
EMBEDDINGS_NAME = "memory.safetensors"
CAPTIONS_NAME = "memory_captions.jsonl"
TENSOR_KEY = "embeddings"


def _check(audio_emb: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    if audio_emb.dim() != 2 or memory.dim() != 2 or audio_emb.shape[1] != memory.shape[1]:
        raise ValueError(f"expected audio (B, D) and memory (N, D), got {tuple(audio_emb.shape)} and "
                         f"{tuple(memory.shape)}")
    if memory.shape[0] == 0:
        raise ValueError("memory is empty")
    return audio_emb.to(device=memory.device, dtype=memory.dtype)


def top_k(audio_emb: torch.Tensor, memory: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """k most cosine-similar memory rows per audio row.

    audio_emb (B, D), memory (N, D), both L2-normalised (cosine = dot product).  Returns
    (indices (B, k) int64, scores (B, k)) sorted by score descending; equal scores -> lower
    index first.  k is capped at N.
    """
    a = _check(audio_emb, memory)
    n = memory.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b = a.shape[0]
    best_s = a.new_empty(b, 0)
    best_i = torch.empty(b, 0, dtype=torch.long, device=a.device)
    for start in range(0, n, chunk_size):
        sims = a @ memory[start:start + chunk_size].T                     # (B, c)
        c = sims.shape[1]
        # The chunk's exact k best (a full sort of 32 x 65 536 costs ~1.7x the matmul).
        # Running bests come first and all have lower indices than this chunk; among equal scores
        # they are already index-ascending, so a stable descending sort keeps lowest-index-first.
        vals, pos = topk_lowest_index(sims, min(k, c), by_value=False)
        s = torch.cat([best_s, vals], dim=1)
        i = torch.cat([best_i, pos + start], dim=1)
        s, order = torch.sort(s, dim=1, descending=True, stable=True)
        best_s, best_i = s[:, :k], i.gather(1, order[:, :k])
    return best_i, best_s


def nearest_indices(audio_emb: torch.Tensor, memory: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (B,) and cosine (B,) of the most similar memory row; ties -> lowest index."""
    a = _check(audio_emb, memory)
    b = a.shape[0]
    best_s = torch.full((b,), -torch.inf, dtype=a.dtype, device=a.device)
    best_i = torch.zeros(b, dtype=torch.long, device=a.device)
    for start in range(0, memory.shape[0], chunk_size):
        sims = a @ memory[start:start + chunk_size].T
        s, i = sims.max(dim=1)             # first maximal index within the chunk
        better = s > best_s                # strict: an equal score in a later chunk loses
        best_s = torch.where(better, s, best_s)
        best_i = torch.where(better, i + start, best_i)
    return best_i, best_s


def nearest_neighbour(audio_emb: torch.Tensor, memory: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
                      ) -> torch.Tensor:
    """Replace each audio row (B, D) by its most cosine-similar memory row -> (B, D)."""
    idx, _ = nearest_indices(audio_emb, memory, chunk_size)
    return memory[idx]


def projection(audio_emb: torch.Tensor, memory: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
               chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Softmax-weighted mix of memory rows, re-normalised -> (B, D).

    w_bi = exp(<a_b, m_i> / T) / sum_j exp(<a_b, m_j> / T);  out_b = normalise(sum_i w_bi m_i).
    Computed over chunks of N with a running max (numerically safe at T = 0.01, where logits span
    up to +-100) and rescaled running sums, so the result equals the one-block softmax.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a = _check(audio_emb, memory)
    b = a.shape[0]
    run_max = torch.full((b, 1), -torch.inf, dtype=a.dtype, device=a.device)
    run_sum = torch.zeros(b, 1, dtype=a.dtype, device=a.device)
    acc = torch.zeros(b, memory.shape[1], dtype=a.dtype, device=a.device)
    for start in range(0, memory.shape[0], chunk_size):
        block = memory[start:start + chunk_size]
        logits = (a @ block.T) / temperature                                # (B, c)
        new_max = torch.maximum(run_max, logits.max(dim=1, keepdim=True).values)
        scale = torch.exp(run_max - new_max)                                # 0 on the first chunk
        w = torch.exp(logits - new_max)
        run_sum = run_sum * scale + w.sum(dim=1, keepdim=True)
        acc = acc * scale + w @ block
        run_max = new_max
    return F.normalize(acc / run_sum, dim=-1)


class CaptionMemory:
    """Caption strings + their L2-normalised text embeddings (float32 (N, D)), row-aligned.

    ``embeddings`` are stored as given (cast to float32); pass ``normalise=True`` to L2-normalise
    them here (``from_texts`` does).
    """

    def __init__(self, embeddings: torch.Tensor, captions: Sequence[str], normalise: bool = False):
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (N, D), got {tuple(embeddings.shape)}")
        if embeddings.shape[0] != len(captions):
            raise ValueError(f"{embeddings.shape[0]} embeddings but {len(captions)} captions")
        emb = embeddings.float()
        self.embeddings = (F.normalize(emb, dim=-1) if normalise else emb).contiguous()
        self.captions = list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @classmethod
    def from_texts(cls, captions: Iterable[str], encode: Callable[[list[str]], torch.Tensor],
                   batch_size: int = 1000) -> "CaptionMemory":
        """Encode every caption with ``encode(list[str]) -> (n, D)`` in batches of ``batch_size``.

        The final partial batch is encoded too (the seed's loop runs len // batch_size batches
        and silently drops up to batch_size - 1 captions).
        """
        texts, parts = [], []
        for batch in _batches(captions, batch_size):
            with torch.inference_mode():
                emb = torch.as_tensor(encode(batch)).float()
            if emb.shape[0] != len(batch):
                raise ValueError(f"encode returned {emb.shape[0]} rows for {len(batch)} captions")
            parts.append(F.normalize(emb, dim=-1))
            texts.extend(batch)
        if not parts:
            raise ValueError("no captions")
        return cls(torch.cat(parts), texts)

    # strategies bound to this memory
    def nearest_neighbour(self, audio_emb, chunk_size: int = DEFAULT_CHUNK):
        return nearest_neighbour(audio_emb, self.embeddings, chunk_size)

    def projection(self, audio_emb, temperature: float = DEFAULT_TEMPERATURE, chunk_size: int = DEFAULT_CHUNK):
        return projection(audio_emb, self.embeddings, temperature, chunk_size)

    def top_k(self, audio_emb, k: int, chunk_size: int = DEFAULT_CHUNK):
        return top_k(audio_emb, self.embeddings, k, chunk_size)

    def retrieve(self, audio_emb, k: int, chunk_size: int = DEFAULT_CHUNK) -> list[list[tuple[str, float]]]:
        """Top-k captions with their cosine scores per audio row."""
        idx, sc = self.top_k(audio_emb, k, chunk_size)
        return [[(self.captions[i], float(s)) for i, s in zip(ri, rs)] for ri, rs in zip(idx.tolist(), sc.tolist())]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write memory.safetensors + memory_captions.jsonl (one JSON string per line)."""
        from overheard.checkpoint import save_weights

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_weights({TENSOR_KEY: self.embeddings}, d / EMBEDDINGS_NAME,
                     metadata={"shape": f"{len(self)}x{self.dim}"})
        with open(d / CAPTIONS_NAME, "w", encoding="utf-8") as f:
            for c in self.captions:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CaptionMemory":
        """Read a directory written by :meth:`save`; ValueError on a missing file or a count mismatch."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        for name in (EMBEDDINGS_NAME, CAPTIONS_NAME):
            if not (d / name).is_file():
                raise ValueError(f"{directory}: missing {name}")
        try:
            tensors = load_file(str(d / EMBEDDINGS_NAME))
        except SafetensorError as e:
            raise ValueError(f"{d / EMBEDDINGS_NAME}: not a valid safetensors file ({e})") from None
        if TENSOR_KEY not in tensors:
            raise ValueError(f"{d / EMBEDDINGS_NAME}: missing tensor {TENSOR_KEY!r}")
        captions = list(iter_captions(d / CAPTIONS_NAME))
        return cls(tensors[TENSOR_KEY], captions)


def iter_captions(path: str | os.PathLike) -> Iterator[str]:
    """Stream the captions of a memory_captions.jsonl file, one per line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            c = json.loads(line)
            if not isinstance(c, str):
                raise ValueError(f"{path}:{lineno}: expected a JSON string, got {type(c).__name__}")
            yield c


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    batch: list[str] = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:  # the last, partial batch
        yield batch
