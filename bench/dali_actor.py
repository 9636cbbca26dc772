"""DALI captioner actor throughput: windows/s by batch size, mode and dtype (no Ray).

    python -m bench.dali_actor                                  # tiny random models, CPU
    python -m bench.dali_actor --model path/to/model-dir --device cuda --dtypes float32,bfloat16 \\
        --batches 1,8,32,64 --windows 256

Runs ``actors.dali_captioner.DaliCaptioner`` directly (it is a plain class, as Ray Data's actor
pool would call it) on batches of ``--windows`` windows of seeded random audio (+ random 336x336
frames for audio+image). Each configuration loads once, warms up on one batch, then is timed over
the windows. Reported: windows/s, ms per window, and on CUDA the peak allocated memory. Greedy
decoding stops at </s>, so caption length matters as much as batch size: random-weight models
rarely emit </s> and run to ``--max-new-tokens`` (the worst case).

What bounds it: per window the LM reads ~prompt + 64 audio tokens (+ 576 image tokens) once, then
decodes up to ``max_new_tokens`` steps with a KV cache; the 7B LM's decode steps are
memory-bandwidth-bound at small batch, so batching (all rows of a batch share one prompt length;
no padding) is what raises throughput on a GPU. With the tiny models here Python overhead per step
dominates and the numbers only show the actor's framework cost.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_batch(n: int, frame: int, seed: int = 0) -> pa.Table:
    from _benchlib import window_batch
    return window_batch(n, frame=frame, seed=seed)


def tiny_model(directory: str) -> str:
    from overheard.dali.tiny import build_tiny_dali

    build_tiny_dali(directory)
    return os.path.join(directory, "dali")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model dir with dali/ (default: tiny random models)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--modes", default="audio,audio+image")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    from actors.dali_captioner import DaliCaptioner
    from jobs.caption_config import DaliConfig, ResourceConfig

    tmp = tempfile.mkdtemp(prefix="bench-dali-")
    path = os.path.join(a.model, "dali") if a.model else tiny_model(tmp)
    rows = []
    for dtype in a.dtypes.split(","):
        for mode in a.modes.split(","):
            act = DaliCaptioner(path, DaliConfig(mode=mode, max_new_tokens=a.max_new_tokens),
                                device=a.device,
                                resources=ResourceConfig(dtype=dtype, torch_threads=a.threads))
            frame = act.size if mode == "audio+image" else 0
            for bs in [int(b) for b in a.batches.split(",")]:
                batches = [make_batch(min(bs, a.windows - i), frame, seed=i)
                           for i in range(0, a.windows, bs)]
                act(batches[0].slice(0, 1))  # warm-up
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for b in batches:
                    act(b)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                peak = (torch.cuda.max_memory_allocated() / 2**30) if a.device.startswith("cuda") else float("nan")
                rows.append((dtype, mode, bs, a.windows / dt, 1000 * dt / a.windows, peak))
    load = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
    print(f"\nDALI actor throughput  device={a.device} threads={a.threads} windows={a.windows} "
          f"max_new_tokens={a.max_new_tokens} load={load} model={a.model or 'tiny random'}")
    print(f"{'dtype':<9} {'mode':<12} {'batch':>5} {'win/s':>8} {'ms/win':>8} {'peak GiB':>9}")
    for d, m, b, w, ms, p in rows:
        print(f"{d:<9} {m:<12} {b:>5} {w:>8.2f} {ms:>8.1f} {p:>9.2f}")
    print("\nreproduce: python -m bench.dali_actor " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
