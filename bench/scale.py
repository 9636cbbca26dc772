"""Archive-scale costs of the caption job (issue 19).

(a) windows/s through what commits output: ``actors.part_writer.write_part`` (the part writer a Ray
    worker runs on each decode block: release of whole sources, schema, sort, zstd Parquet, atomic
    write) on synthetic blocks of window rows as the model actors emit them (512-d float32
    embeddings, captions, scores), on one core. 1 and 8 windows per source, 32 sources per block
    (the packing default for small files).
(b) the caption job on a manifest of N missing files (default 20k; no sizes, so every source is of
    unknown size, stat'ed by its decode task and ends as one not_found row): what is left of the
    job when decoding costs nothing: listing, packing, scheduling, the stat, the actor hop,
    writing, committing. First output (s from the start of run()), sources/s after it, the
    driver's peak RSS. A local Ray with 2 CPUs, the tiny random model; the job's
    --unknown-size-sources 32, 128 and 512 (the default).
(c) and (d): the listing + planning path (``jobs/sources.py``), each size in a fresh process (peak
    RSS, wall and CPU s): (c) a 1M-row vs a 2k-row manifest with ``--limit 2000``; (d) a rerun
    deciding what is left with 1M captioned sources in OUTPUT.
(e) what the driver does before the first decode: plan (list, dedup, spill the todo list) + pack
    it into decode blocks + build the decode stage's input Dataset (``jobs.pipeline.decode_input``,
    with a local Ray of 2 CPUs), for manifests of N sources with sizes, each in a fresh process:
    seconds and the driver's peak RSS. ``--e-root DIR`` runs the same in another checkout (e.g.
    main before streaming packing: the todo list read back, ``decode_blocks``, ``from_arrow``).

    .venv/bin/python bench/scale.py [--windows 200000] [--per-source 1,8] [--missing 20000]
    .venv/bin/python bench/scale.py --only c,d [--manifest-rows 1000000] [--done 1000000]
    .venv/bin/python bench/scale.py --only e [--pack-rows 1000000,5000000] [--e-root /work/main]

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
                commits=len(commits), parts=m["parts"],
                rss_mib=rss / 1024, rss_before_mib=rss0 / 1024)


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


def _pack_child(manifest: str, work: str, root: str = "") -> None:
    """(e) in a fresh process, with this checkout's ``jobs`` (or ``root``'s): plan ``manifest``,
    pack it and build the decode input Dataset as the caption job does; print one JSON line."""
    import inspect
    import json

    if root:
        sys.path.insert(0, root)

    import ray

    from jobs.caption import CaptionConfig
    from jobs.sources import open_listing, plan_sources

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    cfg = CaptionConfig(input=manifest, output=os.path.join(work, "out"))
    rss0 = _peak_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    streaming = "packing" in inspect.signature(plan_sources).parameters
    if streaming:  # packed as spilled; the Dataset reads the parts
        from jobs.pipeline import decode_input, packing

        plan = plan_sources(open_listing(manifest), cfg.output, os.path.join(work, "todo"),
                            packing=packing(cfg))
        t_plan = time.perf_counter() - t0
        ds = decode_input(cfg, plan.parts)
        blocks = None  # not known to the driver: read where they are decoded
    else:  # the todo list read back, packed in one piece, every block put by the driver
        import ray.data

        from jobs.blocks import decode_blocks

        plan = plan_sources(open_listing(manifest), cfg.output, os.path.join(work, "todo"))
        t_plan = time.perf_counter() - t0
        todo = list(plan.tables())
        blocks = decode_blocks(todo, cfg.pack_sources, cfg.unknown_size_sources)
        ds = ray.data.from_arrow(blocks)
        blocks = len(blocks)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps(dict(mode="streaming" if streaming else "driver", todo=plan.count,
                          parts=len(plan.parts), blocks=blocks, plan_s=t_plan, wall_s=wall,
                          cpu_s=cpu, ds=type(ds).__name__, peak_mib=_peak_rss_mib(),
                          ray_mib=rss0)))
    ray.shutdown()


def measure_packing(rows: list[int], root: str = "") -> list[dict]:
    """(e): one fresh process per manifest size (this checkout, or ``root``'s)."""
    import json
    import subprocess

    out = []
    with tempfile.TemporaryDirectory(prefix="ohpack-") as d:
        for n in rows:
            man = write_manifest(os.path.join(d, f"m{n}.parquet"), n)
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--pack-child", man,
                                os.path.join(d, f"w{n}-{len(out)}"), root],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


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
    p.add_argument("--sources-per-block", type=int, default=32)
    p.add_argument("--missing", type=int, default=20_000)
    p.add_argument("--unknown-size-sources", default="32,128,512",
                   help="(b): the job's --unknown-size-sources values to run")
    p.add_argument("--only", default="a,b,c,d", help="parts to run: a, b, c, d")
    p.add_argument("--manifest-rows", type=int, default=1_000_000, help="(c): the big manifest")
    p.add_argument("--done", type=int, default=1_000_000, help="(d): captioned sources in OUTPUT")
    p.add_argument("--all-rows", type=int, default=0,
                   help="(c): also plan a manifest of this many new sources without --limit")
    p.add_argument("--pack-rows", default="1000000",
                   help="(e): manifest sizes (sources with sizes), comma-separated")
    p.add_argument("--e-root", default="", help="(e): run in this checkout instead (before/after)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--pack-child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _plan_child(a.child[0], a.child[1], int(a.child[2]))
        return 0
    if a.pack_child:
        _pack_child(*a.pack_child)
        return 0
    parts = set(a.only.split(","))
    if "e" in parts:
        print_packing(a)
    if parts & {"c", "d"}:
        print_listing(a)
    if "a" not in parts:
        a.windows = 0
    if "b" not in parts:
        a.missing = 0
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
    if not (a.windows or a.missing):
        return 0
    print(f"\nreproduce: RAY_TMPDIR=/tmp/ray-scale .venv/bin/python bench/scale.py --windows "
          f"{a.windows} --per-source {a.per_source} --sources-per-block {a.sources_per_block} "
          f"--missing {a.missing} --unknown-size-sources {a.unknown_size_sources}")
    return 0


def print_packing(a) -> None:
    rows = measure_packing([int(x) for x in a.pack_rows.split(",")], a.e_root)
    print(f"# bench/scale.py (e): plan + pack + build the decode input Dataset, manifest with "
          f"sizes, local Ray 2 CPUs, a fresh process each; checkout "
          f"{a.e_root or 'this one'}; load avg {os.getloadavg()[0]:.1f}")
    print("| sources | path | todo parts | plan s | plan + pack + build s | CPU s | "
          "driver peak RSS MiB | of which Ray started MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['todo']:,} | {r['mode']} | {r['parts']} | {r['plan_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mib']:.0f} | {r['ray_mib']:.0f} |")
    print(f"reproduce: RAY_TMPDIR=/tmp/ray-scale .venv/bin/python bench/scale.py --only e "
          f"--pack-rows {a.pack_rows}" + (f" --e-root {a.e_root}" if a.e_root else "") + "\n")


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
