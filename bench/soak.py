"""Soak (issue 8): the caption job over a few thousand small files on one machine, memory sampled
every second for the driver and every Ray process; no growth after warm-up.

Files: ``--files`` 1-2 s 48 kHz mono wavs written with numpy (cached under /tmp/overheard-bench-media).
Job: jobs.caption.run, default cheap model, local Ray num_cpus=2, defaults. Sampler: /proc every
``--interval`` s over the whole process tree (driver, GCS, raylet, agents, workers, actors).

Summary per group (driver, the model actor(s): ClapCaptioner, or ClapEmbedder + Captioner with
``fuse_models=False``, all Ray worker processes, Ray system processes, whole tree), each over the samples in which the group exists (actors start late on a
loaded machine): RSS after warm-up (median of that span's samples from 25% to 35%), RSS at the end
(median of its last 10%), the slope of a least-squares line through its samples after 25% (MiB/min),
the same for RssAnon (private memory, excludes object-store pages), then verdict lines: PASS when
end - after-warm-up <= max(64 MiB, 10%). Raw samples go to ``--samples`` (JSON).
Parts are written by Ray workers; the driver holds only per-part metadata (it used to batch rows
for ``flush_interval``, 60 s, before writing a part, and its RSS was a saw-tooth).

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
    "ClapCaptioner actor": ("ClapCaptioner actor",),
    "ClapEmbedder actor": ("ClapEmbedder actor",),
    "Captioner actor": ("Captioner actor",),
    "all Ray worker processes": ("decode task worker", "ClapCaptioner actor", "ClapEmbedder actor",
                                 "Captioner actor", "other ray worker"),
    "Ray system (GCS, raylet, agents)": ("ray system",),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--samples", default="/tmp/overheard-soak-samples.json")
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
    import json
    with open(args.samples, "w") as f:
        json.dump(series, f)
    t_all = np.array([x["t"] for x in series])

    def stats(y: np.ndarray):
        present = y > 0
        t, y = t_all[present], y[present]
        rel = (t - t[0]) / max(t[-1] - t[0], 1e-9)
        wu, end, after = (rel >= 0.25) & (rel <= 0.35), rel >= 0.9, rel >= 0.25
        w, e = float(np.median(y[wu])), float(np.median(y[end]))
        slope = np.polyfit(t[after] / 60.0, y[after] / 2**20, 1)[0] if after.sum() > 2 else float("nan")
        return w, e, slope, float(y.max()), t[-1] - t[0]

    def group_series(roles, key) -> np.ndarray:
        if roles is None:
            return np.array([sum(x[key].values()) for x in series], dtype=float)
        return np.array([sum(x[key].get(k, 0) for k in roles) for x in series], dtype=float)

    print("| group | span sampled | RSS after warm-up | RSS at end | change | slope after warm-up | peak "
          "| RssAnon after warm-up -> end |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    allg = dict(GROUPS)
    allg["whole tree"] = None
    for name, roles in allg.items():
        y = group_series(roles, "by_role")
        if not y.any():
            continue
        w, e, slope, peak, span = stats(y)
        ya = group_series(roles, "anon_by_role")
        aw, ae = stats(ya)[:2] if ya.any() else (0.0, 0.0)
        print(f"| {name} | {span:.0f} s | {B.mib(w)} | {B.mib(e)} | {(e - w) / 2**20:+.0f} MiB | "
              f"{slope:+.1f} MiB/min | {B.mib(peak)} | {B.mib(aw)} -> {B.mib(ae)} |")
        if name in ("driver", "ClapCaptioner actor", "ClapEmbedder actor", "Captioner actor",
                    "whole tree"):
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
