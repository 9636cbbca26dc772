"""How likely a caption is about its audio: a [0, 1] confidence from the window's audio embedding.

The signal (chosen by measurement, bench/confidence.py and README "Confidence"): the Mahalanobis
distance of the window's CLAP audio embedding to the audio the model was trained on (mean and
ridge-regularised covariance of the training clips' embeddings). A decoder only knows how to
caption audio whose embedding lies where its training audio lay; silence, noise, music or an
unseen source land elsewhere in the audio space, even when their nearest caption text (what a
text-only decoder and the caption's CLAP cosine look at) is close. Measured with the shipped
sound-world model (bench/confidence.py): AUROC 0.966 for telling 150 in-world windows from 48
silence/noise/chord/speech clips, against 0.681 for the audio-caption CLAP cosine and 0.347 for
logprob (README "Confidence").

Calibration is deterministic and needs no out-of-world data: on held-out in-world clips the
median distance maps to 0.95 and the 95th percentile to 0.5 (a logistic in the distance)::

    confidence = sigmoid((d95 - d) * ln(19) / (d95 - d50))

Silence is the one out-of-world input the distance misses (measured: a near-silent window embeds
close to the training mean, median confidence 0.97), and it has nothing to caption: the confidence
is multiplied by a loudness gate, sigmoid((level_dbfs + 60) / 2.5) of the window's RMS level
(0.5 at -60 dBFS, 0.98 at -50, 3e-4 at -80; the sound world's scenes are -18 to -30 dBFS).

The statistics live in the decoder directory as ``audio_stats.safetensors`` (mean, precision
matrix; float32, 66 kB at 128-d) with the calibration in its metadata. Models without it fall
back to the cosine of the audio embedding to its nearest caption of the decoder's caption memory
(clipped to [0, 1], uncalibrated, AUROC 0.717 on the same clips); without a memory either, the
confidence is null.

numpy only; no Ray, no torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

STATS_FILE = "audio_stats.safetensors"
# ridge as a fraction of the mean per-dimension variance: 0.003 / 0.01 / 0.03 / 0.1 gave AUROC
# 0.962 / 0.959 / 0.951 / 0.943 on a first 40-scene vs 19-clip out-of-world probe with the shipped
# model; 0.01 is a middle that keeps the inverse well conditioned
DEFAULT_RIDGE = 0.01
LOW = 0.5  # "low confidence": beyond the 95th percentile of held-out in-world distances
SILENCE_DBFS = -60.0  # loudness gate midpoint (module docstring)


def level_dbfs(x: np.ndarray) -> float:
    """RMS level of a window's samples in dBFS (-inf-safe: floor -200)."""
    x = np.asarray(x, dtype=np.float64)
    return float(20 * np.log10(max(float(np.sqrt(np.mean(x * x))) if x.size else 0.0, 1e-10)))


def loudness_gate(level: np.ndarray) -> np.ndarray:
    """Multiplier in (0, 1): ~1 for audible windows, ~0 for digital or near silence."""
    z = (np.asarray(level, np.float64) - SILENCE_DBFS) / 2.5
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class AudioStats:
    """Training-audio statistics in CLAP space plus the distance -> confidence calibration."""

    mean: np.ndarray       # (D,)
    precision: np.ndarray  # (D, D): inverse of (covariance + ridge * mean variance * I)
    d50: float             # median distance of held-out in-world clips -> confidence 0.95
    d95: float             # their 95th percentile -> confidence 0.5
    n_train: int = 0
    n_calibration: int = 0
    ridge: float = DEFAULT_RIDGE

    @classmethod
    def fit(cls, train_emb: np.ndarray, heldout_emb: np.ndarray, ridge: float = DEFAULT_RIDGE) -> "AudioStats":
        """Statistics of ``train_emb`` (N, D) and calibration on ``heldout_emb`` (M, D): clips of
        the same world the model never trained on (distances of training clips are biased low)."""
        a = _normalise(train_emb)
        mean = a.mean(0)
        cov = np.cov(a.T)
        d = cov.shape[0]
        prec = np.linalg.inv(cov + ridge * float(np.trace(cov)) / d * np.eye(d))
        st = cls(mean.astype(np.float32), prec.astype(np.float32), 0.0, 0.0, len(a), len(heldout_emb), ridge)
        dist = st.distance(heldout_emb)
        st.d50, st.d95 = float(np.percentile(dist, 50)), float(np.percentile(dist, 95))
        if not st.d95 > st.d50:
            raise ValueError(f"degenerate calibration: d50 {st.d50} >= d95 {st.d95}")
        return st

    def distance(self, emb: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each (L2-normalised) embedding to the training audio."""
        x = _normalise(np.atleast_2d(emb)) - self.mean.astype(np.float64)
        m = np.einsum("ij,jk,ik->i", x, self.precision.astype(np.float64), x)
        return np.sqrt(np.maximum(m, 0.0))

    def confidence(self, emb: np.ndarray) -> np.ndarray:
        """float32 in [0, 1], one per row of ``emb``."""
        z = (self.d95 - self.distance(emb)) * math.log(19.0) / (self.d95 - self.d50)
        return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)

    def save(self, directory: str) -> str:
        import torch

        from overheard.checkpoint import save_weights

        meta = {"d50": self.d50, "d95": self.d95, "n_train": self.n_train,
                "n_calibration": self.n_calibration, "ridge": self.ridge, "signal": "mahalanobis"}
        path = os.path.join(directory, STATS_FILE)
        save_weights({"mean": torch.from_numpy(np.ascontiguousarray(self.mean, np.float32)),
                      "precision": torch.from_numpy(np.ascontiguousarray(self.precision, np.float32))},
                     path, metadata={"overheard_confidence": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, directory: str) -> "AudioStats | None":
        """The statistics saved in ``directory``, or None when the model has none."""
        path = os.path.join(directory, STATS_FILE)
        if not os.path.isfile(path):
            return None
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = json.loads(f.metadata()["overheard_confidence"])
            mean, prec = f.get_tensor("mean"), f.get_tensor("precision")
        if prec.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"{path}: precision {prec.shape} does not match mean {mean.shape}")
        return cls(mean, prec, float(meta["d50"]), float(meta["d95"]), int(meta.get("n_train", 0)),
                   int(meta.get("n_calibration", 0)), float(meta.get("ridge", DEFAULT_RIDGE)))


def memory_confidence(emb: np.ndarray, memory_emb: np.ndarray) -> np.ndarray:
    """Fallback: cosine of each audio embedding to its nearest caption-memory embedding, clipped
    to [0, 1] (uncalibrated; a weaker signal, see the module docstring)."""
    sims = _normalise(np.atleast_2d(emb)) @ _normalise(memory_emb).T
    return np.clip(sims.max(axis=1), 0.0, 1.0).astype(np.float32)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve for scores where ``positive`` should be higher (ties count half):
    the probability that a random positive outscores a random negative."""
    p = np.asarray(positive, np.float64)
    n = np.asarray(negative, np.float64)
    if not len(p) or not len(n):
        raise ValueError("auroc needs both positives and negatives")
    allv = np.concatenate([p, n])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1
    ranks = (first + (counts - 1) / 2.0)[inv]  # average rank of each tie group
    return float((ranks[: len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n)))
