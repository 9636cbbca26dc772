"""Audibility guidance on the sound world: caption quality, audibility and cost with and without.

Held-out sound-world scenes (split ``guidance``) are captioned by the shipped sound-world model
twice through the caption job — plain beam 3 with ``--score-captions`` (so its audibility and
CLAP similarity are measured too) and ``--guidance`` (defaults 0.2 / 1 / 0.015) — then scored
with ``overheard evaluate``. Prints one table.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/guidance_quality.py [--clips 40]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "overheard-guidance-q"))
    a = ap.parse_args(argv)
    import pyarrow.compute as pc
    import ray

    from jobs import evaluate
    from jobs.caption import DEFAULT_MODEL, CaptionConfig, run
    from jobs.sink import read_table_dir
    from overheard.soundworld import write_dataset

    d = write_dataset(os.path.join(a.work, "world"), a.clips, seed=0, split="guidance")
    refs = os.path.join(d, "captions.csv")
    ray.init(num_cpus=2, include_dashboard=False)
    rows = []
    for label, kw in (("plain beam3 (+score-captions)", dict(score_captions=True)),
                      ("guided beam3x5 (0.2/1/0.015)", dict(guidance=True))):
        out = os.path.join(a.work, label.split()[0])
        t0 = time.time()
        m = run(CaptionConfig(input=d, output=out, model=DEFAULT_MODEL, progress=False, show=0,
                              **kw))
        wall = time.time() - t0
        caps = read_table_dir(os.path.join(out, "captions"))
        report = os.path.join(a.work, label.split()[0] + ".json")
        evaluate.main([out, refs, "--out", report])
        scores = json.load(open(report))
        s = scores["metrics"]
        rows.append((label, s, float(pc.mean(caps["audibility"]).as_py()),
                     float(pc.mean(caps["clap_similarity"]).as_py()), m["windows"] / wall))
    print(f"\nSound world, {a.clips} held-out clips (split guidance, seed 0), shipped model; "
          f"reproduce: HF_HUB_OFFLINE=1 .venv/bin/python bench/guidance_quality.py --clips {a.clips}\n")
    print("| run | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | mean P(audible) | mean CLAP sim | windows/s (job, incl. start-up) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, s, aud, sim, wps in rows:
        def g(k):
            v = s.get(k)
            return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"
        print(f"| {label} | {g('bleu_4')} | {g('meteor')} | {g('rouge_l')} | {g('cider_d')} | "
              f"{aud:.3f} | {sim:.3f} | {wps:.2f} |")


if __name__ == "__main__":
    main()
