"""Archive-scale costs of the caption job's driver (issue 19), part (a): windows/s through what
commits output — ``jobs.sink.SourceAssembler`` + ``PartWriter`` fed a synthetic stream of window rows
(as the model actors emit them: 512-d float32 embeddings, captions, scores), on one core.
Parts (c) and (d): the listing + planning path (``jobs/sources.py``), each size in a fresh
process (peak RSS, wall and CPU s): (c) a 1M-row vs a 2k-row manifest with ``--limit 2000``;
(d) a rerun deciding what is left with 1M captioned sources in OUTPUT.

    .venv/bin/python bench/scale.py [--windows 200000] [--per-source 1,8] [--batch 64]
    .venv/bin/python bench/scale.py --only c,d [--manifest-rows 1000000] [--done 1000000]

Prints a table and the command. The stream is built before timing; Parquet parts go to a temp dir
(zstd, as the job writes them). One core: the benchmark pins itself to CPU 0 and torch is not used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stream(n_windows: int, per_source: int, batch: int, dim: int = 512, seed: int = 0):
    """Batches of window rows; each source's windows consecutive, terminal row last (the order
    the actors return them); ``batch`` rows per table, as the model actor's batch size."""
    rng = np.random.default_rng(seed)
    n_src = n_windows // per_source
    uri = np.repeat(np.array([f"s3://archive/part-{i // 1000:05d}/clip-{i:09d}.m4a"
                              for i in range(n_src)], dtype=object), per_source)
    idx = np.tile(np.arange(per_source, dtype=np.int32), n_src)
    nwin = np.where(idx == per_source - 1, per_source, -1).astype(np.int32)
    emb = rng.standard_normal((n_src * per_source, dim)).astype(np.float32)
    caps = np.array(["a dog barks while rain falls on a tin roof",
                     "a vehicle engine rumbles", "people talk in a crowded room"], dtype=object)
    out = []
    for lo in range(0, len(uri), batch):
        hi = min(lo + batch, len(uri))
        n = hi - lo
        out.append(pa.table({
            "source_uri": pa.array(uri[lo:hi], pa.string()),
            "source_version": pa.array(["etag"] * n, pa.string()),
            "window_index": pa.array(idx[lo:hi]), "start_s": pa.array(idx[lo:hi] * 10.0),
            "end_s": pa.array(idx[lo:hi] * 10.0 + 10.0), "n_windows": pa.array(nwin[lo:hi]),
            "error_type": pa.array([""] * n), "error_message": pa.array([""] * n),
            "stage": pa.array([""] * n), "windows_kept": pa.array(np.zeros(n, np.int32)),
            "audio_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb[lo:hi].reshape(-1)), dim),
            "caption": pa.array(caps[np.arange(lo, hi) % 3], pa.string()),
            "logprob": pa.array(np.full(n, -1.5, np.float32)),
            "decoding": pa.array(["plain/beam3"] * n),
            "model_id": pa.array(["clap-0123+dec-4567"] * n)}))
    return out


def measure(n_windows: int, per_source: int, batch: int) -> dict:
    from jobs.sink import PartWriter, SourceAssembler

    tables = stream(n_windows, per_source, batch)
    with tempfile.TemporaryDirectory() as d:
        asm = SourceAssembler()
        w = PartWriter(d, "bench", 512, rows_per_part=50_000, flush_interval_s=1e9)
        t0 = time.process_time()
        t_wall = time.perf_counter()
        released = 0
        for r in [asm.add(t) for t in tables] + [asm.finish()]:
            if r is not None:
                w.add(r)
                released += r.windows
        w.flush()
        cpu = time.process_time() - t0
        wall = time.perf_counter() - t_wall
        assert released == n_windows - n_windows % per_source, released
    return dict(windows=released, cpu_s=cpu, wall_s=wall, parts=len(w.parts))


# ------------------------------------------------------------- (c), (d): listing and planning

def _uris(lo: int, hi: int, seed: int = 0) -> pa.Array:
    """Archive-like URIs (~50 B) of sources lo..hi-1, in a scrambled order (no early stop)."""
    return _names(np.random.default_rng(seed).permutation(np.arange(lo, hi)))


def _names(idx: np.ndarray) -> pa.Array:
    return pa.array([f"s3://archive/part-{i // 1000:05d}/clip-{i:09d}.m4a" for i in idx],
                    pa.string())


def write_manifest(path: str, rows: int, group: int = 1_000_000) -> str:
    """A Parquet manifest of ``rows`` sources in a scrambled order: uri, version (an ETag-like
    32 hex), size; written 1M rows (one row group) at a time."""
    import pyarrow.parquet as pq

    idx = np.random.default_rng(0).permutation(rows)
    with pq.ParquetWriter(path, pa.schema([("uri", pa.string()), ("version", pa.string()),
                                           ("size", pa.int64())])) as w:
        for lo in range(0, rows, group):
            part = idx[lo:lo + group]
            w.write_table(pa.table({"uri": _names(part),
                                    "version": pa.array([f"{i:032x}" for i in part]),
                                    "size": pa.array(np.full(len(part), 160_000, np.int64))}))
    return path


def write_done(output: str, done: int, part_rows: int = 50_000) -> None:
    """OUTPUT with ``done`` captioned sources: caption parts (one window per source, the columns
    resume reads plus a caption) and one failures part: 1% more sources, half of them permanent
    failures (done), half retryable (redone)."""
    import pyarrow.parquet as pq

    for sub in ("captions", "failures"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    for k, lo in enumerate(range(0, done, part_rows)):
        u = _uris(lo, min(done, lo + part_rows), seed=k)
        pq.write_table(pa.table({"source_uri": u, "window_index": pa.array(np.zeros(len(u), np.int32)),
                                 "caption": pa.array(["a dog barks"] * len(u))}),
                       os.path.join(output, "captions", f"part-bench-{k:05d}.parquet"))
    fu = _uris(done, done + done // 100, seed=99)
    pq.write_table(pa.table({"source_uri": fu, "retryable": pa.array(np.arange(len(fu)) % 2 == 0)}),
                   os.path.join(output, "failures", "part-bench-00000.parquet"))


def _plan_child(inp: str, output: str, limit: int) -> None:
    """In a fresh process: check, list, anti-join and plan ``inp`` as the caption job does (the
    todo list read back as build()'s rows); print one JSON line."""
    import json

    from jobs.sources import open_listing, plan_sources

    t0, c0 = time.perf_counter(), time.process_time()
    plan = plan_sources(open_listing(inp), output, os.path.join(output, "runs", "bench", "todo"),
                        limit=limit)
    # read back as today's build() takes it (tuples) when small; a big todo list as Arrow batches
    todo = len(plan.rows()) if plan.count <= 100_000 else sum(t.num_rows for t in plan.tables())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    plan.remove()
    print(json.dumps(dict(wall_s=wall, cpu_s=cpu, todo=todo, listed=plan.listed,
                          skipped=plan.skipped_done,
                          peak_mib=_peak_rss_mib())))


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a child started
    by fork + exec inherits from the parent's image)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(inp: str, output: str, limit: int) -> dict:
    import json
    import subprocess

    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", inp, output,
                        str(limit)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_listing(manifest_rows: int, done: int, limit: int = 2000,
                    all_rows: int = 0) -> list[tuple]:
    """Rows of the (c)/(d) table: (case, result); ``all_rows`` > 0 adds a manifest of that
    many new sources without --limit (more than SPILL_ROWS: deduplicated in hash buckets)."""
    with tempfile.TemporaryDirectory() as d:
        small = write_manifest(os.path.join(d, "small.parquet"), 2000)
        big = write_manifest(os.path.join(d, "big.parquet"), manifest_rows)
        empty = os.path.join(d, "out-empty")
        out = [(f"(c) 2k-row manifest, --limit {limit}", _child(small, empty, limit)),
               (f"(c) {manifest_rows:,}-row manifest, --limit {limit}", _child(big, empty, limit))]
        full = os.path.join(d, "out-done")
        write_done(full, done)
        # the first `done` sources are captioned; 2,000 of the manifest are new
        rerun = write_manifest(os.path.join(d, "rerun.parquet"), done + 2000)
        out.append((f"(d) 2k-row manifest, nothing done", _child(small, empty, 0)))
        out.append((f"(d) rerun: {done + 2000:,}-row manifest, {done:,} done", _child(rerun, full, 0)))
        if all_rows:
            huge = write_manifest(os.path.join(d, "all.parquet"), all_rows)
            out.append((f"{all_rows:,}-row manifest, no --limit (all todo)", _child(huge, empty, 0)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=200_000)
    p.add_argument("--per-source", default="1,8")
    p.add_argument("--batch", type=int, default=64, help="rows per incoming table (actor batch)")
    p.add_argument("--only", default="a,c,d", help="parts to run: a (assembly), c, d (listing)")
    p.add_argument("--manifest-rows", type=int, default=1_000_000, help="(c): the big manifest")
    p.add_argument("--done", type=int, default=1_000_000, help="(d): captioned sources in OUTPUT")
    p.add_argument("--all-rows", type=int, default=0,
                   help="also plan a manifest of this many new sources without --limit")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _plan_child(a.child[0], a.child[1], int(a.child[2]))
        return 0
    parts = set(a.only.split(","))
    if parts & {"c", "d"}:
        print_listing(a)
    if "a" not in parts:
        return 0
    try:
        os.sched_setaffinity(0, {0})
    except (AttributeError, OSError):
        pass
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    print(f"# bench/scale.py (a): driver assembly + Parquet parts, one core, batch {a.batch}, "
          f"512-d float32 embeddings; load avg {os.getloadavg()[0]:.1f}")
    print("| windows per source | windows | CPU s | wall s | windows/s (CPU) | sources/s (CPU) | parts |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in (int(x) for x in a.per_source.split(",")):
        r = measure(a.windows, k, a.batch)
        print(f"| {k} | {r['windows']} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | "
              f"{r['windows'] / r['cpu_s']:,.0f} | {r['windows'] / k / r['cpu_s']:,.0f} | {r['parts']} |")
    print(f"\nreproduce: .venv/bin/python bench/scale.py --windows {a.windows} "
          f"--per-source {a.per_source} --batch {a.batch}")
    return 0


def print_listing(a) -> None:
    rows = measure_listing(a.manifest_rows, a.done, all_rows=a.all_rows)
    print(f"# bench/scale.py (c)/(d): listing + planning (jobs/sources.py: list, dedup, anti-join, "
          f"--limit, todo spilled to Parquet and read back), each in a fresh process; "
          f"load avg {os.getloadavg()[0]:.1f}")
    print("| case | listed | skipped (done) | todo | wall s | CPU s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['listed']:,} | {r['skipped']:,} | {r['todo']:,} | {r['wall_s']:.2f} | "
              f"{r['cpu_s']:.2f} | {r['peak_mib']:.0f} |")
    (_, c0), (_, c1), (_, d0), (_, d1) = rows[:4]
    print(f"\n(c) extra for the big manifest: {c1['wall_s'] - c0['wall_s']:+.2f} s wall, "
          f"{c1['cpu_s'] - c0['cpu_s']:+.2f} CPU s, {c1['peak_mib'] - c0['peak_mib']:+.0f} MiB; "
          f"(d) rerun decision: {d1['wall_s']:.2f} s wall, {d1['cpu_s']:.2f} CPU s, "
          f"peak {d1['peak_mib']:.0f} MiB ({d1['peak_mib'] - d0['peak_mib']:+.0f} MiB over the "
          f"small run)")
    print(f"reproduce: .venv/bin/python bench/scale.py --only c,d --manifest-rows "
          f"{a.manifest_rows} --done {a.done}" + (f" --all-rows {a.all_rows}" if a.all_rows
                                                    else "") + "\n")


if __name__ == "__main__":
    sys.exit(main())
