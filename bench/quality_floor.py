"""Spread of the CI quality metrics across disjoint 100-clip sets (sets tests/test_soundworld_quality.py's floors).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quality_floor.py      # ~8 min on a loaded 2-core CPU

Generates 500 scenes of split "ci" (world seed 0; the test captions set 0 = clips 0-99), captions
them with the shipped model exactly as the caption job does for a 10-s clip (CLAP embedding, beam 3),
and scores each 100-clip set and the caption-ignores-audio lower bound (the decoder fed the mean
memory embedding) with jobs.evaluate. Prints per-set metrics and mean / sd / min.
"""
import os, sys, json, time  # noqa: E401
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np, torch
torch.set_num_threads(1)
import pyarrow as pa, pyarrow.parquet as pq
from overheard import soundworld as sw
from overheard.clap import ClapEncoder
from overheard.decoder import load_decoder as load_model
from overheard.textonly.memory import CaptionMemory
from jobs import evaluate as ev
from overheard import metrics as om
M = os.path.join(ROOT, "overheard", "assets", "soundworld-model")
W = os.path.join(ROOT, "build", "confidence", "quality")
N, SETS = 100, 5
t = time.time()
d = os.path.join(W, "ci")
if not os.path.isfile(os.path.join(d, "captions.csv")):
    sw.write_dataset(W, N * SETS, seed=0, split="ci")
print("world", time.time() - t, flush=True)
import soundfile as sf
files = sorted(f for f in os.listdir(d) if f.endswith(".flac"))
ep = os.path.join(W, "emb.npy")
if not os.path.exists(ep):
    enc = ClapEncoder(M + "/clap")
    E = np.concatenate([enc.embed_audio(np.stack([sf.read(os.path.join(d, f), dtype="float32")[0] for f in files[i:i+20]])) for i in range(0, len(files), 20)])
    np.save(ep, E)
E = np.load(ep)
dec, _ = load_model(M + "/decoder")
with torch.no_grad():
    caps = [c for c, _ in dec.generate(torch.from_numpy(E), method="beam", num_beams=3)]
mem = CaptionMemory.load(M + "/decoder")
mean = torch.nn.functional.normalize(mem.embeddings.mean(0, keepdim=True), dim=-1)
top = dec.generate(mean, method="beam", num_beams=3)[0][0]
print("captioned", time.time() - t, flush=True)
def table(path, rows):
    os.makedirs(os.path.join(path, "captions"), exist_ok=True)
    pq.write_table(pa.table({"source_uri": [r[0] for r in rows], "window_index": pa.array([0]*len(rows), pa.int32()), "caption": [r[1] for r in rows]}), os.path.join(path, "captions", "part-0.parquet"))
    return path
res = []
import csv
refs_all = list(csv.DictReader(open(os.path.join(d, "captions.csv"))))
with om.Scorer("bleu_4,rouge_l,cider_d") as sc:
    for s in range(SETS):
        idx = range(s * N, (s + 1) * N)
        rp = os.path.join(W, f"refs{s}.csv")
        with open(rp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(refs_all[0].keys())); w.writeheader(); w.writerows([refs_all[i] for i in idx])
        m = ev.evaluate(table(os.path.join(W, f"set{s}"), [(os.path.join(d, files[i]), caps[i]) for i in idx]), rp, scorer=sc)["metrics"]
        lb = ev.evaluate(table(os.path.join(W, f"low{s}"), [(os.path.join(d, files[i]), top) for i in idx]), rp, scorer=sc)["metrics"]
        res.append({"model": m, "lower": lb}); print(s, m, lb, flush=True)
for k in ("cider_d", "bleu_4", "rouge_l"):
    v = np.array([r["model"][k] for r in res]); l = np.array([r["lower"][k] for r in res])
    print(k, "mean", v.mean().round(3), "sd", v.std(ddof=1).round(3), "min", v.min().round(3), "lower mean", l.mean().round(3), "lower max", l.max().round(3), "ratio min", (v / l).min().round(2))
json.dump(res, open(os.path.join(W, "variance.json"), "w"), indent=1)
print("total", time.time() - t)
