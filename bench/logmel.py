"""CLAP front end cost (issue 7): the log-mel of a 10-s 48 kHz window, three ways, one CPU thread.

  hf          transformers' ClapFeatureExtractor (float64 numpy; what a transformers user calls)
  torch.stft  LogMel's GPU path (batched torch.stft + |X|^2 + filterbank), here on the CPU
  LogMel      LogMel's CPU path (scipy float32 rfft row by row, filterbank in torch): the default

Per row: CPU ms per window (time.process_time, so the machine's load matters little) at batch 1
and 16, and the largest difference to the hf mel in dB.

Reproduce:
    cd /work/main && .venv/bin/python bench/logmel.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _benchlib as B  # noqa: E402
from overheard.clap import LogMel  # noqa: E402


def cpu_ms(fn, x, reps: int) -> float:
    fn(x[:1])  # warm-up (allocator, FFT plans)
    t = time.process_time()
    for _ in range(reps):
        fn(x)
    return 1000 * (time.process_time() - t) / reps / len(x)


def main() -> int:
    from transformers import ClapFeatureExtractor

    torch.set_num_threads(1)
    fe = ClapFeatureExtractor()
    lm = LogMel(fe, slaney=True)
    rng = np.random.default_rng(0)
    t = np.arange(480000) / 48000
    x = np.stack([0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)
                  for i in range(16)]).astype(np.float32)

    def hf(a):
        out = fe(list(a.astype(np.float64)), sampling_rate=48000, truncation="rand_trunc",
                 padding="repeatpad", return_tensors="np")["input_features"]
        return out[:, 0]

    def stft(a):
        with torch.inference_mode():
            m = lm._stft_mel(torch.from_numpy(a))
            return (10 * torch.log10(torch.clamp(m, min=1e-10))).numpy()

    def cpu(a):
        with torch.inference_mode():
            return lm(torch.from_numpy(a))[:, 0].numpy()

    ref = hf(x[:4])
    print("Reproduce: `cd /work/main && .venv/bin/python bench/logmel.py`\n")
    print(f"Machine: {B.machine_line()}. torch {torch.__version__}, 1 thread.\n")
    print("| front end | CPU ms / window, batch 1 | CPU ms / window, batch 16 | max abs diff to hf (dB) |")
    print("|---|---:|---:|---:|")
    for name, fn in (("hf (ClapFeatureExtractor)", hf), ("torch.stft (GPU path)", stft),
                     ("LogMel CPU path (default)", cpu)):
        b1 = cpu_ms(fn, x[:1], 8)
        b16 = cpu_ms(fn, x, 2)
        diff = float(np.abs(fn(x[:4]) - ref).max())
        print(f"| {name} | {b1:.1f} | {b16:.1f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
