"""Archive-scale costs of the caption job's driver (issue 19), part (a): windows/s through what
commits output — ``jobs.sink.SourceAssembler`` + ``PartWriter`` fed a synthetic stream of window rows
(as the model actors emit them: 512-d float32 embeddings, captions, scores), on one core.

    .venv/bin/python bench/scale.py [--windows 200000] [--per-source 1,8] [--batch 64]

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=200_000)
    p.add_argument("--per-source", default="1,8")
    p.add_argument("--batch", type=int, default=64, help="rows per incoming table (actor batch)")
    a = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
