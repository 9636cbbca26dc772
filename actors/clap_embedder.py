"""Model stage 1: CLAP audio embedding of each window (GPU actor; CPU where there is none).

Columns in:  the window row of ``overheard.schema`` with ``samples`` (the window's real float32
             samples, ``valid_samples`` of them) and ``pad_mode``.
Columns out: the same minus ``samples``, plus
    audio_embedding: fixed_size_list<float32>[D]  L2-normalised CLAP audio embedding
                     (zeros on failure rows)
    clap_id: str     the CLAP weights' id
    level_dbfs: float32  RMS level of the window's real samples (null on failure rows); the
                     captioner's confidence gates silence with it (overheard.confidence)
A batch that raises is retried row by row, so one bad window becomes one failure row
(error_type "model_error") instead of failing the whole job.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actors.device import limit_threads, pick_device, pick_dtype
from overheard.clap import ClapEncoder
from overheard.confidence import level_dbfs
from overheard.media import model_input
from overheard.schema import Failures, add_columns, window_samples


def embed_windows(encoder, windows: list[np.ndarray], window_n: int,
                  pad_modes: list[str]) -> np.ndarray:
    """(len(windows), D) embeddings of windows given by their real samples: each padded (or
    split into model-length chunks, whose embeddings are averaged and re-normalised) by
    ``overheard.media.model_input``; one encoder call for the whole batch."""
    n = encoder.window_samples
    parts = [model_input(x, window_n, n, pm) for x, pm in zip(windows, pad_modes)]
    counts = [len(p) for p in parts]
    emb = encoder.embed_audio(np.concatenate(parts))
    if all(c == 1 for c in counts):
        return emb
    out, k = [], 0
    for c in counts:  # mean over a long window's chunks, re-normalised
        m = emb[k:k + c].mean(0)
        out.append(m / max(np.linalg.norm(m), 1e-12))
        k += c
    return np.stack(out).astype(np.float32)


class ClapEmbedder:
    def __init__(self, clap_path: str, window_s: float = 10.0, device: str = "auto",
                 resources=None):
        """``resources``: the caption job's ``ResourceConfig`` (dtype, torch_threads); None =
        float32, torch's threads left as they are."""
        limit_threads(resources.torch_threads if resources is not None else None)
        self.device = pick_device(device)
        dtype = resources.dtype if resources is not None else "float32"
        self.encoder = ClapEncoder(clap_path, device=self.device, dtype=pick_dtype(dtype))
        self.sr = self.encoder.sampling_rate
        self.window_samples = int(round(window_s * self.sr))

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        emb = np.zeros((n, self.encoder.embedding_dim), dtype=np.float32)
        level = np.full(n, np.nan, np.float32)
        fail = Failures(batch)
        ok = fail.ok
        if ok:
            pads = batch.column("pad_mode").to_pylist()
            x = window_samples(batch.column("samples"), ok)
            for j, i in enumerate(ok):  # the real samples only, not any padding
                if x[j].size:
                    level[i] = level_dbfs(x[j])
            try:
                emb[ok] = embed_windows(self.encoder, x, self.window_samples,
                                        [pads[i] for i in ok])
            except Exception:
                for j, i in enumerate(ok):  # isolate the bad window(s)
                    try:
                        emb[i] = embed_windows(self.encoder, [x[j]], self.window_samples,
                                               [pads[i]])[0]
                    except Exception as e:
                        fail.mark(i, "model_error", "embed",
                                  f"CLAP encoder failed: {type(e).__name__}: {e}")
            for i in np.flatnonzero(~np.isfinite(emb).all(axis=1)):
                fail.mark(int(i), "model_error", "embed",
                          "CLAP encoder produced a non-finite embedding")
                emb[i] = 0.0
        return add_columns(batch, drop=["samples"], **fail.columns(), audio_embedding=emb,
                           clap_id=[self.encoder.model_id] * n, level_dbfs=level)
