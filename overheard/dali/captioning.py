"""Captioning windows with a ``DaliModel``: the one function both the caption job's actor
(``actors/dali_captioner.py``) and the distillation trainer's pseudo-labeller
(``training/dali_distill.py``) call, so both caption a window the same way."""

from __future__ import annotations

import hashlib

import numpy as np


def row_seed(uri: str, window_index: int) -> int:
    """Per-window sampling seed: the same window samples the same caption in any batch or run."""
    return int.from_bytes(hashlib.sha256(f"{uri}#{window_index}".encode()).digest()[:8], "little")


def caption_windows(model, x: np.ndarray, frames: list, seeds: list[int], temperature: float,
                    max_new_tokens: int) -> list:
    """Caption ``x`` (B, CLAP input samples) float32 windows, each with its ``frames[i]`` (a uint8
    S x S x 3 RGB array) or from audio alone (``None``).

    Returns per row ``(caption, logprob, CLAP embedding (E,), has_frame)``, or the exception that
    row raised on its own. Rows of one layout generate together (equal lengths, no padding); a
    layout's batch that raises is retried row by row, so one bad window fails alone."""
    out: list = [None] * len(x)
    for has in (False, True):
        rows = [i for i, f in enumerate(frames) if (f is not None) == has]
        if not rows:
            continue
        fr = np.stack([frames[i] for i in rows]) if has else None
        xs, sd = x[rows], [seeds[i] for i in rows]
        try:
            gen, emb = model.caption(xs, fr, temperature, sd, max_new_tokens)
            for k, i in enumerate(rows):
                out[i] = (gen[k].caption, gen[k].logprob, emb[k], has)
        except Exception:
            for k, i in enumerate(rows):  # isolate the bad window(s)
                try:
                    g, e = model.caption(xs[k:k + 1], None if fr is None else fr[k:k + 1],
                                         temperature, sd[k:k + 1], max_new_tokens)
                    out[i] = (g[0].caption, g[0].logprob, e[0], has)
                except Exception as ex:
                    out[i] = ex
    return out
