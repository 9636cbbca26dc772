"""Throughput benchmark (issue 7): decode ceiling vs naive per-file loop vs overheard end to end.

On generated media of realistic length (default: 60 ten-second AAC-in-mp4 clips + 2 ten-minute flac
files, 44.1 kHz stereo, cached under /tmp/overheard-bench-media) it measures, one after the other on
the same cores:

  (a) decode ceiling  - a multiprocessing pool of ``--cores`` processes only decoding + resampling +
                        windowing (overheard.media.decode_windows), no models, no Ray;
  (b) naive loop      - what a user would write after the seeds' reference code: for each file, load
                        the whole audio with PyAV into memory, cut 10-s windows, ClapEncoder.embed_audio
                        one window at a time, decoder.generate one window at a time (beam 3, the job's
                        default), same models, one process, torch's default threads;
  (c) overheard e2e   - jobs.caption.run on local Ray (ray.init(num_cpus=cores)), defaults unless
                        ``--set field=value`` overrides a CaptionConfig field.
  (m) models batched  - the job's model actor (actors.clap_captioner.ClapCaptioner, its default
                        batches and 1 torch thread) called in this process on decoded window rows
                        of the archive (--model-windows of them), no Ray: the models' own CPU cost.

Issue 19's framework-CPU check: e2e CPU s per window <= 1.25 x ((a) + (m)) CPU s per window.

Per row: windows/s, real-time factor (audio s per wall s), CPU utilisation (CPU seconds of this process
tree -- driver, pool processes, Ray's GCS/raylet/workers -- sampled from /proc every 0.5 s, / wall / cores),
peak RSS (sum over the tree, sampled) and the largest single process. Then the ratios.

Reproduce:
    cd /work/main && .venv/bin/python bench/throughput.py            # ~2 min on 2 idle cores
    ... --long 4 --long-s 1800 --marginal --repeat 3 --naive-files 30 --naive-threads 1
                      # the README table: 130 min of audio, steady state from full - half
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import _benchlib as B  # noqa: E402

COMMAND = "cd /work/main && .venv/bin/python bench/throughput.py"


# ---------------------------------------------------------------------------------- (a) ceiling

def _decode_file(path: str) -> tuple[int, float]:
    from overheard.media import decode_windows
    n, audio = 0, 0.0
    for w in decode_windows(path, window_s=10.0):
        n += 1
        audio += w.end_s - w.start_s
    return n, audio


def decode_ceiling(files: list[Path], cores: int) -> dict:
    # longest first so the pool stays balanced
    order = sorted(files, key=lambda p: -p.stat().st_size)
    ctx = mp.get_context("fork")
    with ctx.Pool(cores) as pool:
        pool.map(int, range(cores))  # pool started before timing
        s = B.ProcSampler().start()
        t = time.perf_counter()
        res = list(pool.imap_unordered(_decode_file, [str(p) for p in order], chunksize=1))
        wall = time.perf_counter() - t
        s.stop()
    return dict(windows=sum(r[0] for r in res), audio_s=sum(r[1] for r in res), wall=wall, sampler=s)


# ---------------------------------------------------------------------------------- (b) naive

def naive_loop(files: list[Path], clap_path: str, decoder_path: str, num_beams: int = 3) -> dict:
    """The per-file loop of the seeds' reference code, with our models (loading not timed)."""
    import av
    import torch

    from overheard.clap import ClapEncoder
    from overheard.decoder import load_decoder

    enc = ClapEncoder(clap_path)
    dec, _ = load_decoder(decoder_path)
    sr, win = enc.sampling_rate, enc.window_samples
    s = B.ProcSampler().start()
    t = time.perf_counter()
    n, audio = 0, 0.0
    for path in files:
        # 1. load the whole file into memory (PyAV, resample to 48 kHz mono)
        with av.open(str(path)) as c:
            rs = av.AudioResampler(format="flt", layout="mono", rate=sr)
            parts = []
            for frame in c.decode(audio=0):
                parts += [f.to_ndarray().reshape(-1) for f in rs.resample(frame)]
            parts += [f.to_ndarray().reshape(-1) for f in rs.resample(None)]
        x = np.concatenate(parts).astype(np.float32)
        audio += x.size / sr
        # 2. cut windows, 3. embed and caption one window at a time
        for start in range(0, x.size, win):
            w = x[start:start + win]
            if w.size < win:
                if w.size < sr // 2 and start > 0:
                    break
                w = np.resize(w, win) if w.size else np.zeros(win, np.float32)
            emb = enc.embed_audio(w[None])
            with torch.inference_mode():
                dec.generate(torch.from_numpy(emb), method="beam", num_beams=num_beams)
            n += 1
    wall = time.perf_counter() - t
    s.stop()
    return dict(windows=n, audio_s=audio, wall=wall, sampler=s)


# ---------------------------------------------------------------------------------- (m) models

def models_batched(files: list[Path], model: str, n_windows: int, overrides: dict) -> dict:
    """The fused model actor on ``n_windows`` decoded window rows (the decode stage's own output,
    taken from the files in turn so clips and long files both appear), in the job's batches;
    CPU seconds of this process (all threads) while it runs. Loading is not timed."""
    import pyarrow as pa

    from actors.clap_captioner import ClapCaptioner
    from actors.windows import decode_sources
    from jobs.caption import CaptionConfig
    from jobs.pipeline import model_kwargs

    cfg = dataclasses.replace(CaptionConfig(input="-", output="-", model=model), **overrides)
    tables, n = [], 0
    for j, p in enumerate(sorted(files, key=lambda p: p.stat().st_size)):
        # the budget left, shared by the files left: every clip gives its window, the long
        # files share the rest (their windows are most of an archive's)
        per_file = max(1, (n_windows - n) // (len(files) - j))
        src = pa.table({"source_uri": [str(p)], "source_version": [""]})
        k = 0
        for t in decode_sources(src, window_s=cfg.window):
            tables.append(t.slice(0, per_file - k))
            k += tables[-1].num_rows
            if k >= per_file:
                break
        n += k
        if n >= n_windows:
            break
    rows = pa.concat_tables(tables).slice(0, n_windows)
    actor = ClapCaptioner(*model_kwargs(cfg, os.path.join(model, "clap"),
                                        os.path.join(model, "decoder"), "cpu"),
                          encoder_batch=cfg.encoder_batch)
    actor(rows.slice(0, 2))  # warm-up
    s = B.ProcSampler().start()
    c0, t = time.process_time(), time.perf_counter()
    for i in range(0, rows.num_rows, cfg.captioner_batch):
        actor(rows.slice(i, cfg.captioner_batch))
    wall, cpu = time.perf_counter() - t, time.process_time() - c0
    s.stop()
    return dict(windows=rows.num_rows, audio_s=float(sum(
        e - b for b, e in zip(rows.column("start_s").to_pylist(), rows.column("end_s").to_pylist()))),
        wall=wall, sampler=s, cpu_run=cpu)


# ---------------------------------------------------------------------------------- (c) e2e

def e2e(files_dir: Path, cores: int, overrides: dict, model: str) -> dict:
    import ray

    from jobs.caption import CaptionConfig, run

    t = time.perf_counter()
    s = B.ProcSampler().start()
    B.ray_init(cores)
    init_s = time.perf_counter() - t
    out = Path(tempfile.mkdtemp(prefix="ovh-bench-out-"))
    try:
        cfg = CaptionConfig(input=str(files_dir), output=str(out), model=model, progress=False,
                            show=0)
        cfg = dataclasses.replace(cfg, **overrides)
        cpu_before = s.sample()["cpu"]
        base = {p: r["cpu"] for p, r in s.procs.items()}
        t = time.perf_counter()
        m = run(cfg)
        wall = time.perf_counter() - t
        cpu_after = s.sample()["cpu"]
        s.stop()
        # where the CPU went: each process's CPU during run(), by the roles it held
        # (CPU s, processes); "ray system" is also every worker before its first task
        by_role: dict[str, list] = {}
        for p, r in s.procs.items():
            roles = sorted(r["roles"] - {"other ray worker", "ray system"}) or sorted(r["roles"])
            key = " + ".join(roles)
            acc = by_role.setdefault(key, [0.0, 0])
            acc[0] += r["cpu"] - base.get(p, 0.0)
            acc[1] += 1
            if os.environ.get("OVERHEARD_BENCH_PROCS"):  # every process, for digging
                print(f"  {r['cpu'] - base.get(p, 0.0):6.2f} CPU s  {key}: {r['title'][:120]}")
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    return dict(windows=m["windows"], audio_s=m["audio_hours"] * 3600, wall=wall, sampler=s,
                init_s=init_s, manifest=m, cpu_run=cpu_after - cpu_before, cpu_by_role=by_role)


def _median_run(files_dir: Path, args, overrides: dict) -> dict:
    """e2e ``--repeat`` times; the run with the median wall time, with every wall time kept
    (one run's wall varies by several seconds: Ray start-up, actor placement)."""
    runs = sorted((e2e(files_dir, args.cores, overrides, args.model) for _ in range(args.repeat)),
                  key=lambda r: r["wall"])
    r = runs[len(runs) // 2]
    r["walls"] = [round(x["wall"], 1) for x in runs]
    return r


# ---------------------------------------------------------------------------------- report

def _parse_overrides(items: list[str]) -> dict:
    from jobs.caption import CaptionConfig
    from jobs.config_cli import leaf_fields
    types = {f.name: f.type for _, f in leaf_fields(CaptionConfig)}
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        ty = types[k]
        out[k] = (v.lower() in ("1", "true", "yes")) if ty in (bool, "bool") else (
            int(v) if ty in (int, "int") else float(v) if ty in (float, "float") else v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=60, help="10-s AAC/mp4 clips")
    ap.add_argument("--long", type=int, default=2, help="long flac files")
    ap.add_argument("--long-s", type=float, default=600.0, help="length of each long file (s)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--model", default=str(ROOT / "overheard" / "assets" / "tiny-random-model"))
    ap.add_argument("--only", default="abcm", help="which rows: subset of 'abcm'")
    ap.add_argument("--model-windows", type=int, default=128,
                    help="(m): decoded windows the model actor is timed on")
    ap.add_argument("--naive-files", type=int, default=0,
                    help="run the naive loop on a deterministic subset of this many files "
                         "(0 = all); its windows/s is what is compared")
    ap.add_argument("--naive-threads", type=int, default=0,
                    help="torch threads for the naive loop (0 = torch's default, one per core)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run (c) (and (c')) this many times; the median run is reported")
    ap.add_argument("--marginal", action="store_true",
                    help="also run (c) on half the files: the difference is the steady state")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a CaptionConfig field for (c), e.g. --set encoder_batch=64")
    args = ap.parse_args(argv)
    overrides = _parse_overrides(args.set)

    t0 = time.perf_counter()
    files = B.realistic_media(args.clips, args.long, args.long_s)
    gen_s = time.perf_counter() - t0
    # the job lists a folder: give it exactly these files
    d = B.CACHE / f"set-{args.clips}x10s-{args.long}x{int(args.long_s)}s"
    d.mkdir(parents=True, exist_ok=True)
    for p in files:
        if not (d / p.name).exists():
            os.link(p, d / p.name)
    audio_total = sum(B.duration_s(p) for p in files)

    import torch
    print(f"Reproduce: `{COMMAND}" + "".join(f" {a}" for a in (argv or sys.argv[1:])) + "`\n")
    print(f"Machine: {B.machine_line()}. torch {torch.__version__} (CPU, default threads "
          f"{torch.get_num_threads()}); media ready in {gen_s:.0f} s.")
    print(f"Media: {args.clips} x 10-s AAC-in-mp4 + {args.long} x {args.long_s / 60:g}-min flac, "
          f"44.1 kHz stereo ({audio_total / 60:.1f} min of audio); model {args.model}"
          + (f"; e2e overrides {overrides}" if overrides else "") + ".\n")

    rows = {}
    if "a" in args.only:
        la = B.load_now()
        rows["a"] = dict(decode_ceiling(files, args.cores), load=(la, B.load_now()))
    if "b" in args.only:
        clap = os.path.join(args.model, "clap")
        dec = os.path.join(args.model, "decoder")
        nf = files
        if args.naive_files:
            # every k-th file (the clips come first, so a small subset is clips only)
            k = max(1, len(files) // args.naive_files)
            nf = files[::k][: args.naive_files]
        if args.naive_threads:
            torch.set_num_threads(args.naive_threads)
        la = B.load_now()
        rows["b"] = dict(naive_loop(nf, clap, dec), load=(la, B.load_now()))
    if "m" in args.only:
        la = B.load_now()
        rows["m"] = dict(models_batched(files, args.model, args.model_windows, overrides),
                         load=(la, B.load_now()))
    if "c" in args.only and args.marginal:
        # the same kinds of file, half as many: the difference to the full run is the steady
        # state, free of the fixed start-up (Ray workers importing torch, models loading)
        clips = [p for p in files if p.suffix == ".mp4"]
        longs = [p for p in files if p.suffix == ".flac"]
        half = clips[: len(clips) // 2] + longs[: len(longs) // 2]
        dh = B.link_subset(half, d.name + "-half")
        la = B.load_now()
        rows["h"] = dict(_median_run(dh, args, overrides), load=(la, B.load_now()))
    if "c" in args.only:
        la = B.load_now()
        rows["c"] = dict(_median_run(d, args, overrides), load=(la, B.load_now()))

    names = {"a": f"(a) decode ceiling (pool of {args.cores}, decode+resample+window only)",
             "b": f"(b) naive per-file loop (1 process, torch threads {torch.get_num_threads()}, "
                  f"1 window at a time" + (f", {rows['b']['windows']} windows of a {args.naive_files}-file "
                                           "subset)" if args.naive_files and "b" in rows else ")"),
             "h": "(c') overheard e2e on half the files (for the steady state)",
             "c": f"(c) overheard e2e, local Ray num_cpus={args.cores}",
             "m": "(m) models batched (the fused model actor in one process, no Ray)"}
    print("| run | windows | wall s | windows/s | real-time factor | CPU util (tree CPU s / wall / cores) "
          "| CPU s per window | peak RSS, whole tree | largest process | load avg (start->end) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for k, r in rows.items():
        s = r["sampler"]
        cpu = r.get("cpu_run", s.cpu_s())
        big = max(s.procs.values(), key=lambda p: p["rss"], default=None)
        big_s = f"{B.mib(big['rss'])} ({sorted(big['roles'])[0]})" if big else ""
        print(f"| {names[k]} | {r['windows']} | {r['wall']:.1f} | {r['windows'] / r['wall']:.2f} | "
              f"{r['audio_s'] / r['wall']:.1f}x | {100 * cpu / r['wall'] / args.cores:.0f}% | "
              f"{cpu / max(r['windows'], 1):.3f} | "
              f"{B.mib(s.peak_total_rss())} | {big_s} | {r['load'][0]:.1f}->{r['load'][1]:.1f} |")
    print()
    wps = {k: r["windows"] / r["wall"] for k, r in rows.items()}
    if "c" in rows:
        c = rows["c"]
        print(f"e2e wall excludes ray.init ({c['init_s']:.1f} s, done before run()); it includes "
              f"model validation in the driver, listing, actor start-up and writing Parquet. Manifest: "
              f"{c['manifest']['windows']} windows, wall_s {c['manifest']['wall_s']}, "
              f"status {c['manifest']['status']}, failures {c['manifest']['failures_by_type'] or 'none'}.")
        print("e2e CPU s during run() by process role (processes): " + ", ".join(
            f"{role} {v:.1f} ({n})" for role, (v, n) in sorted(c["cpu_by_role"].items(),
                                                              key=lambda kv: -kv[1][0])
            if v >= 0.05))
        print("e2e peak RSS by role (largest single process while in that role): " + ", ".join(
            f"{role} {B.mib(v)}" for role, v in sorted(c["sampler"].peak_by_role().items())))
        if args.repeat > 1:
            print("e2e wall times of the repeats (s): " + "; ".join(
                f"{names[k].split(' ')[0]} {rows[k]['walls']}" for k in ("h", "c") if k in rows))
        print(f"e2e start-up (run() to the first finished file: listing, model checks, actors "
              f"loading, the first batches) {c['manifest'].get('first_output_s', float('nan')):.1f} s.")
        if "a" in rows:
            print(f"Ratio e2e / decode ceiling (windows/s): {wps['c'] / wps['a']:.2f} (target >= 0.8)")
        if "b" in rows:
            print(f"Ratio e2e / naive loop (windows/s): {wps['c'] / wps['b']:.2f} (target >= 5)")
        if "h" in rows:
            h = rows["h"]
            dw, dt = c["windows"] - h["windows"], c["wall"] - h["wall"]
            dcpu = c["cpu_run"] - h["cpu_run"]
            steady = dw / dt if dt > 0 else float("nan")
            fixed = h["wall"] - h["windows"] / steady if dt > 0 else float("nan")
            print(f"Steady state (full minus half archive): +{dw} windows in +{dt:.1f} s = "
                  f"{steady:.2f} windows/s at {dcpu / max(dw, 1):.3f} CPU s per window; fixed "
                  f"cost (wall minus windows / steady rate) {fixed:.1f} s.")
            if "a" in rows:
                print(f"Ratio steady e2e / decode ceiling: {steady / wps['a']:.2f}")
            if "b" in rows:
                print(f"Ratio steady e2e / naive loop: {steady / wps['b']:.2f}")
    cpw = {k: r.get("cpu_run", r["sampler"].cpu_s()) / max(r["windows"], 1) for k, r in rows.items()}
    if "c" in cpw:
        # Load-insensitive view: CPU seconds per window (what an idle machine converts to windows/s
        # as cores / CPU-s-per-window when every core is kept busy).
        if "a" in cpw:
            print(f"Ratio by CPU cost, decode ceiling / e2e (CPU s per window): {cpw['a'] / cpw['c']:.2f}")
        if "b" in cpw:
            print(f"Ratio by CPU cost, naive / e2e (CPU s per window): {cpw['b'] / cpw['c']:.2f}")
        if "a" in cpw and "m" in cpw:
            floor = cpw["a"] + cpw["m"]
            print(f"Framework CPU check (issue 19): e2e {cpw['c']:.4f} CPU s/window vs decode "
                  f"{cpw['a']:.4f} + models batched {cpw['m']:.4f} = {floor:.4f}: ratio "
                  f"{cpw['c'] / floor:.2f} (target <= 1.25); framework share "
                  f"{cpw['c'] - floor:.4f} CPU s/window.")
    print(f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s; load average at end "
          f"{B.load_now():.1f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
