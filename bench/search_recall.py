"""Search recall on the sound world: does a query for a source find the clips that contain it?

Held-out sound-world scenes (split ``search``, never seen by training: each split's scene seeds
come from its own name) are captioned by the caption job with the sound-world CLAP
(``build/soundworld-clap``, trained by ``training/clap_contrastive.py``), indexed by the index
job, and searched with ``jobs.search``. Each scene is 10 s, so one window = one clip. For every
source type two queries are asked: its plain caption phrase ("a dog barks", built from the
generator's first subject and verb) and the generator's description of it
(``soundworld.SOURCES[name]["description"]``).

Metrics per query, over the top 10 windows (k = 10):

* precision@10 = fraction of the 10 results whose clip contains the source;
* recall@10    = fraction of the clips containing the source that are in the top 10, divided
  by its best possible value min(10, n_relevant) / n_relevant (so 1.0 = the top 10 is as full
  of relevant clips as it can be; equals precision@10 when a source is in >= 10 clips);
* chance       = n_relevant / n_clips (expected precision of a random top 10).

Modes: ``vector`` (CLAP text->audio cosine alone) and ``hybrid`` (vector fused with BM25 on the
captions by reciprocal rank fusion). The caption decoder here is a tiny random-weight one of the
CLAP's dimension (no trained sound-world decoder exists yet), so its captions carry no meaning
and the hybrid numbers show what the text side costs when captions are noise.

    python bench/search_recall.py --clips 120
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clap", default=os.path.join(ROOT, "build", "soundworld-clap"))
    p.add_argument("--clips", type=int, default=120)
    p.add_argument("--split", default="search")
    p.add_argument("--work", default="", help="working dir (default: a temp dir, removed)")
    p.add_argument("-k", type=int, default=10)
    a = p.parse_args(argv)
    if not os.path.exists(os.path.join(a.clap, "config.json")):
        print(f"no sound-world CLAP at {a.clap}: train it with training/clap_contrastive.py",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow.parquet as pq

    from jobs.caption import CaptionConfig
    from jobs.caption import run as caption
    from jobs.index import IndexConfig
    from jobs.index import run as index
    from jobs.search import search
    from overheard import soundworld as sw
    from overheard.clap import ClapEncoder
    from overheard.tiny import build_tiny_decoder

    work = a.work or tempfile.mkdtemp(prefix="search-recall-")
    t0 = time.time()
    try:
        clips = os.path.join(work, "clips", a.split)
        if not os.path.exists(os.path.join(clips, "captions.parquet")):
            sw.write_dataset(os.path.join(work, "clips"), a.clips, seed=0, split=a.split)
        truth = pq.read_table(os.path.join(clips, "captions.parquet"),
                              columns=["file", "sources"]).to_pylist()
        has = {os.path.join(clips, r["file"]): set(r["sources"].split()) for r in truth}
        t_data = time.time() - t0
        dec = os.path.join(work, "decoder")
        if not os.path.exists(os.path.join(dec, "config.json")):
            build_tiny_decoder(dec, embedding_dim=ClapEncoder(a.clap).embedding_dim, seed=0)
        out = os.path.join(work, "captions")
        caption(CaptionConfig(input=clips, output=out, clap=a.clap, decoder=dec,
                              progress=False, show=0))
        idx = os.path.join(work, "index")
        s = index(IndexConfig(captions=out, index=idx))
        t_pipe = time.time() - t0 - t_data
        n = len(has)
        rows = []
        for name, src in sw.SOURCES.items():
            rel = {u for u, srcs in has.items() if name in srcs}
            if not rel:
                continue
            subj, verb = src["subjects"][0], src["verbs"][0][0]
            for qkind, q in (("phrase", f"{subj} {verb}"), ("description", src["description"])):
                for mode in ("vector", "hybrid"):
                    hits = search(idx, q, k=a.k, clap=a.clap, mode=mode)
                    got = [h["source_uri"] in rel for h in hits]
                    prec = sum(got) / a.k
                    rec = sum(got) / len(rel) / (min(a.k, len(rel)) / len(rel))
                    rows.append(dict(source=name, query_kind=qkind, query=q, mode=mode,
                                     relevant=len(rel), precision=prec, recall=rec,
                                     chance=len(rel) / n))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nsound world, split '{a.split}': {n} held-out 10-s clips, {s['rows_total']} windows "
          f"indexed; CLAP {a.clap}; k={a.k}\n")
    print("| source | clips | chance | phrase query | vector P@10 / R@10 | hybrid P@10 / R@10 "
          "| description: vector P@10 / R@10 | hybrid P@10 / R@10 |")
    print("|---|---:|---:|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault(r["source"], {})[(r["query_kind"], r["mode"])] = r
    for name, d in by.items():
        ph = d[("phrase", "vector")]
        cells = [f"{d[(qk, m)]['precision']:.2f} / {d[(qk, m)]['recall']:.2f}"
                 for qk in ("phrase", "description") for m in ("vector", "hybrid")]
        print(f"| {name} | {ph['relevant']} | {ph['chance']:.2f} | \"{ph['query']}\" | "
              + " | ".join(cells) + " |")
    print("| **mean** | | {:.2f} | | ".format(
        sum(by[s][("phrase", "vector")]["chance"] for s in by) / len(by)) + " | ".join(
        "{:.2f} / {:.2f}".format(
            sum(by[s][(qk, m)]["precision"] for s in by) / len(by),
            sum(by[s][(qk, m)]["recall"] for s in by) / len(by))
        for qk in ("phrase", "description") for m in ("vector", "hybrid")) + " |")
    print(f"\n(data {t_data:.0f}s, caption+index {t_pipe:.0f}s)")
    print("command: python bench/search_recall.py " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    json.dump(rows, sys.stderr) if os.environ.get("SEARCH_RECALL_JSON") else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
