"""Device and thread choices shared by the model actors."""

from __future__ import annotations

import torch


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


def limit_threads(n: int | None) -> None:
    """Cap intra-op threads: several actors share a node's cores, and torch's default of one
    thread per core makes 3 processes on 2 cores thrash (measured ~1.6x slower per window)."""
    if n:
        torch.set_num_threads(max(1, int(n)))
