"""Model stage 1: CLAP audio embedding of each window (GPU actor; CPU where there is none).

Columns in:  the window columns of ``actors.windows`` (``samples`` = float32 PCM bytes).
Columns out: the same minus ``samples``, plus
    audio_embedding: fixed_size_list<float32>[D]  L2-normalised CLAP audio embedding
                     (zeros on failure rows)
    model_id: str    the CLAP weights' id
    level_dbfs: float32  RMS level of the window's real samples (null on failure rows); the
                     captioner's confidence gates silence with it (overheard.confidence)
A batch that raises is retried row by row, so one bad window becomes one failure row
(error_type "model_error") instead of failing the whole job.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actors.device import limit_threads, pick_device, pick_dtype
from actors.windows import samples_matrix
from overheard.clap import ClapEncoder
from overheard.confidence import level_dbfs


def fit_to_model(x: np.ndarray, valid: int, n: int) -> np.ndarray:
    """Make one window exactly ``n`` samples for the model.

    Shorter windows repeat their real audio then zero-pad (LAION-CLAP's "repeatpad"); longer
    windows (e.g. --window 30 on a 10-s model) are returned as several model-length chunks,
    whose embeddings the caller averages. Deterministic: no random crop anywhere.
    """
    if len(x) == n:
        return x[None]
    if len(x) < n:
        valid = max(1, min(valid, len(x)))
        reps = n // valid
        out = np.zeros(n, dtype=np.float32)
        out[: reps * valid] = np.tile(x[:valid], reps)
        return out[None]
    chunks = [x[i:i + n] for i in range(0, valid, n)] or [x[:n]]
    # each chunk as CLAP would see that audio alone: a partial last chunk (the 20-25 s of a 25-s
    # clip in a --whole-clip 30 window) is repeat-padded from its own real samples, not left
    # with the window's padding (zeros after 25 s: the window repeats only whole copies)
    return np.stack([fit_to_model(c[:max(1, min(len(c), valid - i * n))],
                                  min(len(c), valid - i * n), n)[0]
                     for i, c in enumerate(chunks)])


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

    def _embed(self, samples, rows: list[int], valid: list[int]) -> np.ndarray:
        x = samples_matrix(samples, rows, self.window_samples)
        n = self.encoder.window_samples
        parts = [fit_to_model(x[i], valid[i], n) for i in range(len(x))]
        counts = [len(p) for p in parts]
        emb = self.encoder.embed_audio(np.concatenate(parts))
        if all(c == 1 for c in counts):
            return emb
        out, k = [], 0
        for c in counts:  # mean over a long window's chunks, re-normalised
            m = emb[k:k + c].mean(0)
            out.append(m / max(np.linalg.norm(m), 1e-12))
            k += c
        return np.stack(out).astype(np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        dim = self.encoder.embedding_dim
        emb = np.zeros((n, dim), dtype=np.float32)
        level = np.full(n, np.nan, np.float32)
        err_type = batch.column("error_type").to_pylist()
        err_msg = batch.column("error_message").to_pylist()
        stage = batch.column("stage").to_pylist()
        ok = [i for i in range(n) if not err_type[i]]
        if ok:
            samples = batch.column("samples")
            start = batch.column("start_s").to_numpy()
            end = batch.column("end_s").to_numpy()
            valid = [int(round((end[i] - start[i]) * self.sr)) for i in range(n)]
            for i in ok:  # the real samples only, not the window's zero padding
                try:
                    x = samples_matrix(samples, [i], self.window_samples)[0]
                    level[i] = level_dbfs(x[: max(1, valid[i])])
                except Exception:  # a malformed window: the embedding below reports it
                    pass
            try:
                emb[ok] = self._embed(samples, ok, [valid[i] for i in ok])
            except Exception:
                for i in ok:  # isolate the bad window(s)
                    try:
                        emb[i] = self._embed(samples, [i], [valid[i]])[0]
                    except Exception as e:
                        err_type[i], stage[i] = "model_error", "embed"
                        err_msg[i] = f"CLAP encoder failed: {type(e).__name__}: {e}"[:2000]
            bad = ~np.isfinite(emb).all(axis=1)
            for i in np.flatnonzero(bad):
                if not err_type[i]:
                    err_type[i], stage[i] = "model_error", "embed"
                    err_msg[i] = "CLAP encoder produced a non-finite embedding"
                emb[i] = 0.0
        out = batch.drop_columns(["samples", "error_type", "error_message", "stage"])
        out = out.append_column("error_type", pa.array(err_type, pa.string()))
        out = out.append_column("error_message", pa.array(err_msg, pa.string()))
        out = out.append_column("stage", pa.array(stage, pa.string()))
        out = out.append_column("audio_embedding", pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), pa.float32()), dim))
        out = out.append_column("model_id", pa.array([self.encoder.model_id] * n, pa.string()))
        return out.append_column("level_dbfs", pa.array(level, pa.float32(), mask=np.isnan(level)))
