"""Soak (issue 8): the caption job over a few thousand small files on one machine, memory sampled
every second for the driver and every Ray process; no growth after warm-up.

Files: ``--files`` 1-2 s 48 kHz mono wavs written with numpy (cached under /tmp/overheard-bench-media).
Job: jobs.caption.run, default cheap model, local Ray num_cpus=2, defaults. Sampler: /proc every
``--interval`` s over the whole process tree (driver, GCS, raylet, agents, workers, actors).

Summary per group (driver, ClapEmbedder actor, Captioner actor, all Ray worker processes, Ray system
processes, whole tree): RSS after warm-up (median of the samples from 25% to 35% of the job's run
time), RSS at the end (median of the last 10%), the slope of a least-squares line through every
sample after 25% (MiB/min), then verdict lines: PASS when end - after-warm-up <= max(64 MiB, 10%).
The driver batches rows for ``flush_interval`` (60 s) before writing a part, so its RSS is a saw-tooth.

Reproduce:
    cd /work/main && .venv/bin/python bench/soak.py                  # 2000 files, ~3-6 min idle
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import _benchlib as B  # noqa: E402

GROUPS = {
    "driver": ("driver",),
    "ClapEmbedder actor": ("ClapEmbedder actor",),
    "Captioner actor": ("Captioner actor",),
    "all Ray worker processes": ("decode task worker", "ClapEmbedder actor", "Captioner actor",
                                 "other ray worker"),
    "Ray system (GCS, raylet, agents)": ("ray system",),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    files = B.small_wavs(args.files, "small-wavs")
    d = B.link_subset(files, f"small-wavs-{args.files}")
    print(f"Reproduce: `cd /work/main && .venv/bin/python bench/soak.py"
          + "".join(f" {a}" for a in (argv or sys.argv[1:])) + "`\n")
    print(f"Machine: {B.machine_line()}. Media ready in {time.perf_counter() - t0:.0f} s.\n")
    la = B.load_now()
    r = B.run_job_sampled(d, interval=args.interval)
    m, s = r["manifest"], r["sampler"]
    print(f"Job: {len(files)} files, {m['windows']} windows, {r['rows']} rows ({r['unique']} unique), "
          f"status {m['status']}, failures {m['failures_by_type'] or 'none'}; run() wall "
          f"{r['wall']:.0f} s = {m['windows'] / r['wall']:.1f} windows/s; {len(s.series)} samples; "
          f"load average {la:.1f} -> {B.load_now():.1f}.\n")
    series = [x for x in s.series if x["t"] >= r["t_run"]]
    t = np.array([x["t"] for x in series])
    t_rel = t - t[0]
    run_s = max(t_rel[-1], 1e-9)
    wu = (t_rel >= 0.25 * run_s) & (t_rel <= 0.35 * run_s)
    end = t_rel >= 0.9 * run_s
    after = t_rel >= 0.25 * run_s

    def group_series(roles) -> np.ndarray:
        return np.array([sum(x["by_role"].get(k, 0) for k in roles) for x in series], dtype=float)

    print("| group | RSS after warm-up | RSS at end | change | slope after warm-up | peak |")
    print("|---|---:|---:|---:|---:|---:|")
    verdicts = []
    allg = dict(GROUPS)
    allg["whole tree"] = None
    for name, roles in allg.items():
        y = (np.array([x["rss"] for x in series], float) if roles is None else group_series(roles))
        if not y.any():
            continue
        w, e = float(np.median(y[wu])), float(np.median(y[end]))
        slope = np.polyfit(t[after] / 60.0, y[after] / 2**20, 1)[0] if after.sum() > 2 else float("nan")
        print(f"| {name} | {B.mib(w)} | {B.mib(e)} | {(e - w) / 2**20:+.0f} MiB | "
              f"{slope:+.1f} MiB/min | {B.mib(y.max())} |")
        if name in ("driver", "ClapEmbedder actor", "Captioner actor", "whole tree"):
            ok = e - w <= max(64 * 2**20, 0.10 * w)
            verdicts.append(f"{'PASS' if ok else 'FAIL'}: {name} RSS end - after warm-up = "
                            f"{(e - w) / 2**20:+.0f} MiB (limit max(64 MiB, 10%))")
    print()
    ok_rows = r["rows"] == r["unique"] == m["windows"] == len(files)
    verdicts.append(f"{'PASS' if ok_rows else 'FAIL'}: exactly one row per window "
                    f"({r['rows']} rows, {len(files)} one-window files)")
    print("\n".join(verdicts))
    print(f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
