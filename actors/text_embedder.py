"""CLAP text embedding of caption rows (actor pool; GPU where there is one, else CPU).

Columns in:  ``index`` (int64), ``caption`` (str)
Columns out: the same plus
    embedding: fixed_size_list<float32>[D]  L2-normalised CLAP text embedding of ``caption``
No Ray import: Ray Data schedules this class (``map_batches(TextEmbedder, ...)``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actors.device import limit_threads, pick_device, pick_dtype
from overheard.clap import ClapEncoder


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float -> fixed_size_list<float32>[D] column."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


class TextEmbedder:
    def __init__(self, clap_path: str, device: str = "auto", dtype: str = "float32",
                 torch_threads: int | None = None):
        limit_threads(torch_threads)
        self.device = pick_device(device)
        self.encoder = ClapEncoder(clap_path, device=self.device, dtype=pick_dtype(dtype))
        self.model_id = self.encoder.model_id
        self.dim = self.encoder.embedding_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = batch.column("caption").to_pylist()
        emb = self.encoder.embed_text(captions) if captions else np.zeros((0, self.dim), np.float32)
        if not np.isfinite(emb).all():
            raise ValueError("CLAP text encoder produced a non-finite embedding")
        return batch.select(["index", "caption"]).append_column("embedding", embedding_array(emb))
