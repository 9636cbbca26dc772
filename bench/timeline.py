"""Timeline boundaries on sound-world recordings with known event boundaries.

    RAY_TMPDIR=/tmp/ray-bench HF_HUB_OFFLINE=1 .venv/bin/python bench/timeline.py    # ~6 min on 2 busy cores

Recordings: each is a sequence of events; an event is one sound source (``overheard.soundworld``,
``relation == "single"`` scenes: dog, beeps, knocks, rain, engine, siren, birds, typing, a man,
a woman), played for 2-3 *different* 10-s scenes of that source back to back; consecutive events
have different sources. True boundaries are the event changes (multiples of 10 s). Two sets of
recordings: ``dev`` (thresholds are chosen on it) and ``test`` (reported with the chosen ones).

The caption job (the shipped sound-world model, 10-s windows) runs on them with ``--hop 10``
(windows touch) and ``--hop 5`` (windows overlap by half); ``overheard.timeline.segments``
merges the windows with each (sim, words) pair. A predicted boundary (a segment start after the
first) matches a true one within ±1 window (±10 s: one window length); matching is one-to-one,
greedy by distance. Precision = matched / predicted, recall = matched / true.

Rows: ``every window`` (no merging), ``caption only`` (sim > 1: only equal captions merge), and the
(sim, words) grid. Prints a Markdown table per hop and the command; writes ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIMS = [0.70, 0.80, 0.85, 0.90, 0.95]
WORDS = [0.0, 0.1, 0.2, 0.3, 0.5]  # 0.0: the embedding rule alone


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scene_pool(n: int, seed: int) -> dict[str, list[int]]:
    """{source name: scene seeds} of the single-source scenes among ``n`` generated ones."""
    from overheard.soundworld import clip_seed, make_scene

    pool: dict[str, list[int]] = {}
    for i in range(n):
        s = clip_seed(seed, "timeline", i)
        _, _, meta = make_scene(s)
        if meta["relation"] == "single":
            pool.setdefault(meta["sources"][0]["name"], []).append(s)
    return {k: v for k, v in sorted(pool.items()) if len(v) >= 2}


def write_recordings(d: str, pool: dict[str, list[int]], n_rec: int, n_events: int,
                     rng: np.random.Generator) -> dict[str, list[float]]:
    """Write ``n_rec`` flac recordings under ``d``; returns {file name: true boundaries (s)}."""
    import soundfile as sf

    from overheard.soundworld import SR, make_scene

    os.makedirs(d, exist_ok=True)
    names = list(pool)
    truth = {}
    for r in range(n_rec):
        parts, bounds, prev, t = [], [], None, 0.0
        for e in range(n_events):
            name = str(rng.choice([n for n in names if n != prev]))
            k = int(rng.integers(2, 4))
            seeds = rng.choice(pool[name], size=min(k, len(pool[name])), replace=False)
            if e:
                bounds.append(t)
            for s in seeds:
                parts.append(make_scene(int(s))[0])
                t += 10.0
            prev = name
        fname = f"rec_{r:02d}.flac"
        sf.write(os.path.join(d, fname), np.concatenate(parts), SR, subtype="PCM_16")
        truth[fname] = bounds
    return truth


def match(pred: list[float], true: list[float], tol: float) -> int:
    """One-to-one matches within ``tol`` seconds, greedy by distance."""
    pairs = sorted((abs(p - t), i, j) for i, p in enumerate(pred) for j, t in enumerate(true)
                   if abs(p - t) <= tol + 1e-9)
    used_p, used_t, n = set(), set(), 0
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i), used_t.add(j)
            n += 1
    return n


def score(caps, truth: dict[str, list[float]], sim: float, words: float, tol: float,
          every: bool = False) -> dict:
    from overheard.timeline import segments

    tp = n_pred = n_true = n_seg = 0
    if every:
        seg = caps.select(["source_uri", "start_s"]).to_pylist()
        by: dict[str, list[float]] = {}
        for r in seg:
            by.setdefault(r["source_uri"], []).append(r["start_s"])
        starts = {u: sorted(v)[1:] for u, v in by.items()}
        n_seg = caps.num_rows
    else:
        seg = segments(caps, sim, words)
        n_seg = seg.num_rows
        starts = {}
        for r in seg.to_pylist():
            if r["segment_index"] > 0:
                starts.setdefault(r["source_uri"], []).append(r["start_s"])
    for uri, bounds in truth.items():
        pred = next((v for u, v in starts.items() if u.endswith("/" + uri)), [])
        tp += match(pred, bounds, tol)
        n_pred += len(pred)
        n_true += len(bounds)
    p = tp / n_pred if n_pred else 1.0
    r = tp / n_true if n_true else 1.0
    return dict(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0,
                segments=n_seg, predicted=n_pred, true=n_true)


def caption(d: str, out: str, hop: float) -> object:
    from jobs.caption import DEFAULT_MODEL, CaptionConfig, run
    from jobs.sink import read_table_dir

    if not os.path.isdir(os.path.join(out, "captions")):
        for attempt in range(3):  # on a crowded machine Ray's node start can time out (30 s)
            try:
                run(CaptionConfig(input=d, output=out, model=DEFAULT_MODEL, progress=False,
                                  show=0, window=10.0, hop=hop))
                break
            except Exception as e:  # noqa: BLE001 - only "timed out during startup" is retried
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise
                log(f"Ray start timed out, retrying ({e})")
    return read_table_dir(os.path.join(out, "captions"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/overheard-bench-timeline")
    ap.add_argument("--pool", type=int, default=200, help="scenes generated to find single ones")
    ap.add_argument("--recordings", type=int, default=3, help="recordings per set (dev, test)")
    ap.add_argument("--events", type=int, default=6, help="events per recording")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.time()
    truth_path = os.path.join(a.work, "truth.json")
    if os.path.exists(truth_path):
        truth = json.load(open(truth_path))
    else:
        log(f"generating {a.pool} scenes to find single-source ones")
        pool = scene_pool(a.pool, a.seed)
        log(f"pool: {', '.join(f'{k} {len(v)}' for k, v in pool.items())}")
        rng = np.random.default_rng(a.seed)
        truth = {s: write_recordings(os.path.join(a.work, s), pool, a.recordings, a.events, rng)
                 for s in ("dev", "test")}
        json.dump(truth, open(truth_path, "w"), indent=1)
    results = {}
    for hop in (10.0, 5.0):
        caps = {}
        for s in ("dev", "test"):
            log(f"captioning {s} with --hop {hop:g}")
            caps[s] = caption(os.path.join(a.work, s), os.path.join(a.work, f"out-{s}-hop{hop:g}"),
                              hop)
        rows = [("every window", None, None, True), ("caption only", 1.01, 1.01, False)]
        rows += [(f"sim {sm:.2f}, words {w:.1f}", sm, w, False) for sm in SIMS for w in WORDS]
        res = []
        for label, sm, w, every in rows:
            r = {s: score(caps[s], truth[s], sm or 0, w or 0, 10.0, every) for s in ("dev", "test")}
            res.append(dict(label=label, sim=sm, words=w, **r))
        results[f"hop{hop:g}"] = res
        print(f"\n### 10-s windows, hop {hop:g} s, tolerance ±10 s "
              f"({sum(len(v) for v in truth['dev'].values())} dev / "
              f"{sum(len(v) for v in truth['test'].values())} test boundaries, "
              f"{caps['dev'].num_rows} / {caps['test'].num_rows} windows)\n")
        print("| merge rule | dev P | dev R | dev F1 | test P | test R | test F1 | test segments |")
        print("|---|---|---|---|---|---|---|---|")
        for r in res:
            d, t = r["dev"], r["test"]
            print(f"| {r['label']} | {d['precision']:.2f} | {d['recall']:.2f} | {d['f1']:.2f} | "
                  f"{t['precision']:.2f} | {t['recall']:.2f} | {t['f1']:.2f} | {t['segments']} |")
        best = max(res[2:], key=lambda r: (round(r["dev"]["f1"], 3), r["sim"]))
        print(f"\nbest on dev: {best['label']} -> test P {best['test']['precision']:.2f} "
              f"R {best['test']['recall']:.2f} F1 {best['test']['f1']:.2f}")
    json.dump(results, open(os.path.join(a.work, "results.json"), "w"), indent=1)
    print(f"\n{time.time() - t0:.0f} s (recordings and captions are reused from --work when "
          "present). Command: RAY_TMPDIR=/tmp/ray-bench HF_HUB_OFFLINE=1 "
          f".venv/bin/python bench/timeline.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
