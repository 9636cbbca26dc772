"""Memory stays flat as the archive grows (issue 7): peak RSS per decode task worker and per actor for
N and 10*N files.

Runs the caption job (default cheap model, local Ray num_cpus=2, defaults otherwise) twice, on N and
on 10*N short wav files (1-2 s, 48 kHz mono, written with numpy), each with a fresh Ray instance, and
samples every process of the tree from /proc every 0.25 s. For each role it reports the largest RSS
any single process had while in that role (Ray sets the process title: ``ray::MapBatches(...)``,
``ray::MapWorker(MapBatches(ClapEmbedder))``, ...) and the peak of the whole tree. RSS includes
object-store pages a worker has mapped (shared memory), so the numbers are upper bounds.

Reproduce:
    cd /work/main && .venv/bin/python bench/memory_flat.py             # N=20 vs 200, ~2-4 min idle
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import _benchlib as B  # noqa: E402

# ClapCaptioner: the fused model actor (default); ClapEmbedder + Captioner: --set fuse_models=false
ROLES = ("driver", "decode task worker", "ClapCaptioner actor", "ClapEmbedder actor",
         "Captioner actor", "ray system")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--factor", type=int, default=10)
    args = ap.parse_args(argv)
    sizes = (args.n, args.n * args.factor)
    t0 = time.perf_counter()
    files = B.small_wavs(max(sizes), "small-wavs")
    print(f"Reproduce: `cd /work/main && .venv/bin/python bench/memory_flat.py"
          + "".join(f" {a}" for a in (argv or sys.argv[1:])) + "`\n")
    print(f"Machine: {B.machine_line()}.\n")
    res = {}
    for n in sizes:
        d = B.link_subset(files[:n], f"small-wavs-{n}")
        la = B.load_now()
        r = B.run_job_sampled(d, interval=0.25)
        r["load"] = (la, B.load_now())
        res[n] = r
        m = r["manifest"]
        print(f"N={n}: {m['windows']} windows, {r['rows']} rows ({r['unique']} unique), wall "
              f"{r['wall']:.1f} s, status {m['status']}, load {la:.1f}->{B.load_now():.1f}")
    print()
    a, b = sizes
    print(f"| role (largest single process) | peak RSS, {a} files | peak RSS, {b} files | change "
          f"| peak RssAnon, {a} files | peak RssAnon, {b} files | change |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    pa_, pb_ = res[a]["sampler"].peak_by_role(), res[b]["sampler"].peak_by_role()
    qa_, qb_ = (res[a]["sampler"].peak_by_role("anon_by_role"),
                res[b]["sampler"].peak_by_role("anon_by_role"))
    worst = worst_anon = 0.0
    for role in ROLES:
        x, y = pa_.get(role, 0), pb_.get(role, 0)
        if not (x or y):
            continue  # a role this configuration does not have
        xa, ya = qa_.get(role, 0), qb_.get(role, 0)
        ch = (y - x) / x * 100 if x else float("nan")
        cha = (ya - xa) / xa * 100 if xa else float("nan")
        if role != "ray system" and x:
            worst = max(worst, ch)
            worst_anon = max(worst_anon, cha)
        print(f"| {role} | {B.mib(x)} | {B.mib(y)} | {ch:+.0f}% | {B.mib(xa)} | {B.mib(ya)} | {cha:+.0f}% |")
    ta, tb = res[a]["sampler"].peak_total_rss(), res[b]["sampler"].peak_total_rss()
    print(f"| whole tree (sum, sampled) | {B.mib(ta)} | {B.mib(tb)} | {(tb - ta) / ta * 100:+.0f}% |")
    print()
    for what, w in (("RSS", worst), ("RssAnon (private)", worst_anon)):
        print(f"{'PASS' if w <= 15.0 else 'FAIL'}: largest per-role peak {what} growth from {a} to {b} "
              f"files is {w:+.0f}% (limit +15%)")
    for n in sizes:
        r = res[n]
        ok_rows = r["rows"] == r["unique"] == r["manifest"]["windows"]
        print(f"{'PASS' if ok_rows else 'FAIL'}: {n} files -> {r['rows']} rows, one per window")
    print(f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
