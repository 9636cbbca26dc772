"""``overheard serve`` on a 100k-window index: search latency through the HTTP API, page weight.

    RAY_TMPDIR=/tmp/ray-bench .venv/bin/python bench/serve.py --rows 100000 --queries 200

The caption output is SYNTHETIC (no archive of that size can be captioned on this machine in
reasonable time): ``--rows`` caption rows in the caption job's own Parquet schema, 30 windows of
10 s per file, 512-d L2-normalised embeddings drawn around 256 cluster centres (windows of
recurring sounds), captions composed from 40 sound subjects x 24 actions x 16 settings (varied,
real words, so the BM25 half of the hybrid search has work to do), 2,000 failure rows in 4 types
and one run manifest. The query CLAP is a random-weight CLAP with the tiny test text tower and a
512-d projection (the real model's output width, so vector search costs what it would); the cost of
a full-size text tower (RoBERTa-base, random weights, same FLOPs as the real one) is measured
separately and printed, since it adds to every query.

Steps: write the output -> ``jobs.index.run`` (at 100k rows it also builds the IVF-PQ
index) -> ``python -m jobs.serve OUTPUT --index INDEX --port 0`` in a subprocess -> sequential
requests from this process (``urllib``), one at a time, after 5 warm-up queries. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SUBJECTS = ("a dog", "a cat", "a man", "a woman", "a child", "a crowd", "a car", "a truck",
            "a train", "a plane", "an engine", "a motorcycle", "a bird", "birds", "a rooster",
            "a cow", "a horse", "a baby", "a siren", "a bell", "a clock", "a phone", "a door",
            "glass", "water", "rain", "wind", "thunder", "a fire", "a keyboard", "a drum",
            "a guitar", "a piano", "a violin", "a choir", "a vacuum cleaner", "a saw",
            "a hammer", "footsteps", "a helicopter")
ACTIONS = ("barks", "meows", "speaks", "sings", "laughs", "cheers", "passes by", "honks",
           "rumbles", "roars", "idles", "revs", "chirps", "crows", "moos", "neighs", "cries",
           "wails", "rings", "ticks", "slams", "breaks", "splashes", "falls")
SETTINGS = ("in the distance", "nearby", "on a roof", "in a room", "on a street", "in a forest",
            "by the sea", "in a kitchen", "while people talk", "while music plays",
            "in the rain", "at night", "twice", "loudly", "softly", "with an echo")
QUERIES = ("glass breaking", "a dog barks", "rain on a roof", "a siren passes by",
           "people cheering", "a baby cries at night", "engine idling", "birds chirp in a forest",
           "a door slams twice", "thunder rumbles in the distance", "someone typing on a keyboard",
           "water splashes by the sea", "a helicopter overhead", "a bell rings", "piano music",
           "footsteps in a room", "a train passes", "a man speaks loudly", "wind", "a cow moos")


def tiny_clap_512(directory: str) -> str:
    """Random-weight CLAP: the test suite's tiny towers, the real model's 512-d projection."""
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    from overheard.clap import save_clap_model
    from overheard.tiny import SOUND_SENTENCES, tiny_clap_config
    from overheard.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(SOUND_SENTENCES, vocab_size=400)
    torch.manual_seed(0)
    model = ClapModel(tiny_clap_config(len(tok), projection_dim=512)).eval()
    fe = ClapFeatureExtractor.from_pretrained(
        os.path.join(ROOT, "overheard", "assets", "tiny-random-model", "clap"))
    save_clap_model(model, fe, tok, directory)
    return directory


def write_output(out: str, rows: int, model_id: str, part_rows: int = 10_000) -> None:
    from overheard.schema import FAILURE_SCHEMA, caption_schema

    schema = caption_schema(512)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, 512)).astype(np.float32)
    os.makedirs(os.path.join(out, "captions"))
    os.makedirs(os.path.join(out, "failures"))
    parts, t0 = [], time.time()
    for p, start in enumerate(range(0, rows, part_rows)):
        ids = np.arange(start, min(start + part_rows, rows))
        n = len(ids)
        x = (centres[rng.integers(0, 256, n)]
             + 0.6 * rng.standard_normal((n, 512)).astype(np.float32))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        caps = [f"{SUBJECTS[a]} {ACTIONS[b]} {SETTINGS[c]}" for a, b, c in zip(
            rng.integers(0, len(SUBJECTS), n), rng.integers(0, len(ACTIONS), n),
            rng.integers(0, len(SETTINGS), n))]
        t = pa.table({
            "source_uri": [f"s3://archive/tapes/{i // 30:06d}.mp4" for i in ids],
            "source_version": ["etag"] * n,
            "window_index": (ids % 30).astype(np.int32),
            "start_s": (ids % 30) * 10.0, "end_s": (ids % 30) * 10.0 + 10.0,
            "caption": caps, "decoding": ["beam"] * n,
            "logprob": rng.uniform(-3, -0.5, n).astype(np.float32),
            "clap_similarity": rng.uniform(0, 0.5, n).astype(np.float32),
            "audibility": pa.nulls(n, pa.float32()),
            "model_id": [model_id] * n, "run_id": ["bench"] * n,
            "audio_embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 512),
        }, schema=schema)
        uri = os.path.join(out, "captions", f"part-bench-{p:05d}.parquet")
        pq.write_table(t, uri, compression="zstd")
        parts.append(uri)
    types = ["corrupt", "truncated", "timeout", "no_audio_track"]
    f = pa.Table.from_pylist([dict(
        source_uri=f"s3://archive/bad/{i:06d}.mp4", source_version="etag", stage="decode",
        error_type=types[i % 4], message=f"bad/{i:06d}.mp4: synthetic failure {types[i % 4]}",
        retryable=types[i % 4] == "timeout", windows_kept=0, run_id="bench")
        for i in range(2000)], schema=FAILURE_SCHEMA)
    pq.write_table(f, os.path.join(out, "failures", "part-bench-00000.parquet"))
    os.makedirs(os.path.join(out, "runs", "bench"))
    m = dict(run_id="bench", status="completed", started_at=t0, input="s3://archive/tapes/",
             output=out, windows=rows, audio_hours=round(rows * 10 / 3600, 6),
             sources_captioned=rows // 30, sources_failed=2000, sources_skipped_done=0,
             failures_by_type={t: 500 for t in types}, wall_s=round(time.time() - t0, 3),
             parts=parts, note="synthetic (bench/serve.py)")
    m["windows_per_s"] = round(rows / m["wall_s"], 3)
    with open(os.path.join(out, "runs", "bench", "manifest.json"), "w") as fh:
        json.dump(m, fh)


def fetch(url: str) -> tuple[float, bytes]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
    return (time.perf_counter() - t) * 1000.0, body


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def full_text_tower_ms(n: int = 20) -> tuple[float, float]:
    """(median wall ms, median CPU ms) of one 12-token query through a full-size CLAP text
    tower + projection on one thread (random weights: the same FLOPs as laion/clap-htsat-
    unfused's RoBERTa-base). On a shared, loaded machine the CPU time is the better estimate of
    what the query costs on an idle core."""
    import torch
    from transformers import ClapConfig, ClapModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = ClapModel(ClapConfig()).eval()
    ids = torch.randint(3, 50000, (1, 12))
    wall, cpu = [], []
    with torch.no_grad():
        for _ in range(n + 3):
            t, c = time.perf_counter(), time.thread_time()
            m.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
            wall.append((time.perf_counter() - t) * 1000.0)
            cpu.append((time.thread_time() - c) * 1000.0)
    return statistics.median(wall[3:]), statistics.median(cpu[3:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=20, help="results per query (the page asks for 20)")
    ap.add_argument("--keep", default="", help="work dir to keep (default: a temp dir, removed)")
    ap.add_argument("--no-text-tower", action="store_true",
                    help="skip the full-size text tower measurement")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = a.keep or tempfile.mkdtemp(prefix="overheard-bench-serve-")
    out, idx, clap = (os.path.join(work, n) for n in ("out", "index", "clap"))
    proc = None
    try:
        if not os.path.exists(out):
            tiny_clap_512(clap)
            from overheard.clap import clap_model_id
            write_output(out, a.rows, clap_model_id(clap) + "+bench-decoder")
        t = time.time()
        from jobs.index import IndexConfig, run
        s = run(IndexConfig(captions=out, index=idx, clap=clap))
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # an index job that ran on Ray: free its CPUs
        print(f"index: {s['rows_total']} rows, {s['parts_new']} new parts, "
              f"{time.time() - t:.1f} s", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", out, "--index", idx,
                                 "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        url = line.rsplit(" on ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:"), line
        rng = np.random.default_rng(1)
        qs = [QUERIES[i] for i in rng.integers(0, len(QUERIES), a.queries + 5)]
        lat, sizes = [], []
        for i, q in enumerate(qs):
            if i == 5:
                cpu0 = cpu_s(proc.pid)
            ms, body = fetch(url + "api/search?" + urllib.parse.urlencode({"q": q, "k": a.k}))
            if i >= 5:
                lat.append(ms)
                sizes.append(len(body))
                assert len(json.loads(body)) == a.k
        search_cpu_ms = (cpu_s(proc.pid) - cpu0) * 1000.0 / a.queries
        other = {}
        for name, path in [("source (30 windows)", "api/source?" + urllib.parse.urlencode(
                               {"source_uri": f"s3://archive/tapes/{a.rows // 60:06d}.mp4"})),
                           ("runs", "api/runs"), ("failures (500 of 2000)", "api/failures"),
                           ("failures error_type=timeout", "api/failures?error_type=timeout")]:
            ts = [fetch(url + path) for _ in range(20)]
            other[name] = (statistics.median(x[0] for x in ts), len(ts[0][1]))
        static = {p: len(fetch(url + p)[1]) for p in ("", "static/app.js", "static/style.css",
                                                        "runs", "source")}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    tower = None if a.no_text_tower else full_text_tower_ms()
    shell = static[""] + static["static/app.js"] + static["static/style.css"]
    print(f"\n{a.rows} windows (synthetic), {a.queries} queries k={a.k}, sequential, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| request | p50 ms | p95 ms | response bytes |")
    print("|---|---|---|---|")
    print(f"| /api/search (hybrid: tiny text tower + vector + BM25 + RRF) | {pct(lat, 50):.0f} | "
          f"{pct(lat, 95):.0f} | {statistics.median(sizes):.0f} |")
    print(f"| server CPU per search (all its threads; load-independent) | {search_cpu_ms:.0f} "
          f"(mean) | | |")
    for name, (ms, n) in other.items():
        print(f"| /api/{name} | {ms:.0f} (median of 20) | | {n} |")
    if tower is not None:
        print(f"\nfull-size CLAP text tower per query, one thread (add to the search rows "
              f"above): {tower[0]:.0f} ms wall, {tower[1]:.0f} ms CPU (median of 20)")
    print(f"\npage weight: search page {shell} B (HTML {static['']} + JS "
          f"{static['static/app.js']} + CSS {static['static/style.css']}) + results JSON "
          f"{statistics.median(sizes):.0f} B for k={a.k}; runs page HTML {static['runs']} B; "
          f"audio is fetched only on play (preload=none): a 10-s window is "
          f"{44 + 10 * 48000 * 2} B of WAV")
    print(f"\nreproduce: RAY_TMPDIR=/tmp/ray-bench .venv/bin/python bench/serve.py "
          f"--rows {a.rows} --queries {a.queries} --k {a.k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
