"""Archive-scale costs of the caption job (issue 19).

(a) windows/s through what commits output: ``actors.part_writer.write_part`` (the part writer a Ray
    worker runs on each decode block: release of whole sources, schema, sort, zstd Parquet, atomic
    write) on synthetic blocks of window rows as the model actors emit them (512-d float32
    embeddings, captions, scores), on one core. 1 and 8 windows per source, 32 sources per block
    (the packing default for small files).
(b) the caption job on a manifest of N missing files (default 20k; no sizes, so every source is of
    unknown size and ends as one read_error row): what is left of the job when decoding costs
    nothing: listing, packing, scheduling, the actor hop, writing, committing. First output (s from
    the start of run()), sources/s after it, the driver's peak RSS. A local Ray with 2 CPUs, the
    tiny random model; the job's --unknown-size-sources 32 (default) and 128.

    .venv/bin/python bench/scale.py [--windows 200000] [--per-source 1,8] [--missing 20000]

Prints a table per part and the command. (a) pins itself to CPU 0; its stream is built before
timing; parts go to a temp dir. ``--missing 0`` skips (b); ``--windows 0`` skips (a).
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


def measure(n_windows: int, per_source: int, sources_per_block: int = 32) -> dict:
    from actors.part_writer import write_part

    tables = [t.append_column("block", pa.repeat(pa.scalar(i, pa.int64()), t.num_rows))
              for i, t in enumerate(stream(n_windows, per_source, per_source * sources_per_block))]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.process_time()
        t_wall = time.perf_counter()
        metas = [write_part(t, output=d, run_id="bench", attempt="0123abcd") for t in tables]
        cpu = time.process_time() - t0
        wall = time.perf_counter() - t_wall
        written = sum(m.column("windows")[0].as_py() for m in metas)
        assert written == n_windows - n_windows % per_source, written
    return dict(windows=written, cpu_s=cpu, wall_s=wall, parts=len(metas))


def missing_run(n: int, unknown: int = 32, cpus: int = 2) -> dict:
    """(b): the caption job over a manifest of ``n`` files that do not exist."""
    import json
    import resource

    import pyarrow.parquet as pq
    import ray

    from jobs.caption import TINY_MODEL, CaptionConfig, run

    with tempfile.TemporaryDirectory(prefix="ohscale-") as d:
        man = os.path.join(d, "manifest.parquet")
        pq.write_table(pa.table({"uri": [f"{d}/missing/clip-{i:07d}.wav" for i in range(n)]}), man)
        ray.init(num_cpus=cpus, include_dashboard=False, ignore_reinit_error=True)
        try:
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = os.path.join(d, "out")
            m = run(CaptionConfig(input=man, output=out, model=TINY_MODEL, progress=False,
                                  show=0, run_id="scale", unknown_size_sources=unknown))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        finally:
            ray.shutdown()
        commits = []
        for name in sorted(os.listdir(os.path.join(out, "_commits"))):
            with open(os.path.join(out, "_commits", name)) as f:
                commits.append(json.load(f))
    commits.sort(key=lambda c: c["committed_at"])
    first = commits[0]
    after = sum(c["sources"] for c in commits[1:])
    span = commits[-1]["committed_at"] - first["committed_at"]
    return dict(sources=n, status=m["status"], failed=m["sources_failed"],
                first_output_s=first["committed_at"] - m["started_at"], wall_s=m["wall_s"],
                sources_per_s=after / span if span > 0 else float("nan"),
                commits=len(commits), parts=len(m["parts"]),
                rss_mib=rss / 1024, rss_before_mib=rss0 / 1024)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=200_000)
    p.add_argument("--per-source", default="1,8")
    p.add_argument("--sources-per-block", type=int, default=32)
    p.add_argument("--missing", type=int, default=20_000)
    p.add_argument("--unknown-size-sources", default="32,128",
                   help="(b): the job's --unknown-size-sources values to run")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.windows:
        aff = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {0})
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        print(f"# bench/scale.py (a): part writer (actors/part_writer.write_part), one core, "
              f"{a.sources_per_block} sources per block, 512-d float32 embeddings; "
              f"load avg {os.getloadavg()[0]:.1f}")
        print("| windows per source | windows | parts | CPU s | wall s | windows/s (CPU) | "
              "sources/s (CPU) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for k in (int(x) for x in a.per_source.split(",")):
            r = measure(a.windows, k, a.sources_per_block)
            print(f"| {k} | {r['windows']} | {r['parts']} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | "
                  f"{r['windows'] / r['cpu_s']:,.0f} | {r['windows'] / k / r['cpu_s']:,.0f} |")
        os.sched_setaffinity(0, aff)
        pa.set_cpu_count(len(aff))
    if a.missing:
        print(f"\n# bench/scale.py (b): caption job, manifest of {a.missing} missing files (no "
              f"sizes), local Ray 2 CPUs, tiny model; load avg {os.getloadavg()[0]:.1f}")
        print("| sources | --unknown-size-sources | status | failure rows | first output s | "
              "sources/s after it | wall s | commits | parts | driver peak RSS MiB |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for k in (int(x) for x in a.unknown_size_sources.split(",")):
            r = missing_run(a.missing, k)
            print(f"| {r['sources']} | {k} | {r['status']} | {r['failed']} | "
                  f"{r['first_output_s']:.1f} | {r['sources_per_s']:,.0f} | {r['wall_s']:.1f} | "
                  f"{r['commits']} | {r['parts']} | {r['rss_mib']:.0f} |")
    print(f"\nreproduce: RAY_TMPDIR=/tmp/ray-scale .venv/bin/python bench/scale.py --windows "
          f"{a.windows} --per-source {a.per_source} --sources-per-block {a.sources_per_block} "
          f"--missing {a.missing} --unknown-size-sources {a.unknown_size_sources}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
