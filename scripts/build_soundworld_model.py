"""Package the sound-world model that ships in overheard/assets/soundworld-model.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soundworld.py                 # trains + measures
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/build_soundworld_model.py --decoder noise
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/build_soundworld_model.py --stats-only   # confidence stats only

Takes the contrastively trained CLAP (build/soundworld-clap) and one text-only decoder of the
benchmark (build/bench-soundworld/decoders/<name>), and writes ``clap/`` + ``decoder/`` (the
caption job's model layout) + MODEL_CARD.md.  To stay a few MB the decoder weights and its caption
memory are stored as float16 (both loaders cast to float32; captions are checked to be unchanged
on the benchmark's held-out clips) and the memory keeps each distinct caption once.

It also writes ``decoder/audio_stats.safetensors`` (overheard.confidence: mean + precision of the
CLAP audio embeddings of the ``--stats-train`` training scenes, calibrated on ``--stats-calibration``
scenes of a split no model trained on), which the caption job's ``confidence`` column needs;
``--stats-only`` adds just that file to an existing model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CLAP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json")


@dataclass
class PackageConfig:
    bench: str = field(default=os.path.join(ROOT, "build", "bench-soundworld"), metadata={
        "help": "bench/soundworld.py's output folder (decoders/<name> under it)"})
    clap: str = field(default=os.path.join(ROOT, "build", "soundworld-clap"), metadata={
        "help": "the contrastively trained CLAP (HF ClapModel directory)"})
    decoder: str = field(default="noise", metadata={"help": "decoder name under <bench>/decoders"})
    strategy: str = field(default="plain", metadata={"help": "the strategy the card recommends"})
    out: str = field(default=os.path.join(ROOT, "overheard", "assets", "soundworld-model"),
                     metadata={"help": "model directory to (re)write"})
    stats_only: bool = field(default=False, metadata={
        "help": "only (re)write decoder/audio_stats.safetensors of --out from its own clap/"})
    stats_train: int = field(default=400, metadata={"min": 1,
                                                    "help": "training scenes for the statistics"})
    stats_calibration: int = field(default=150, metadata={
        "min": 1, "help": "held-out scenes for calibration"})
    world_seed: int = field(default=0, metadata={"help": "seed of the sound world's scenes"})


def main(argv=None) -> int:
    from jobs.config_cli import parse

    a = parse(PackageConfig, argv, "build_soundworld_model.py", __doc__.splitlines()[0])
    if a.stats_only:
        write_audio_stats(a.out, a.stats_train, a.stats_calibration, a.world_seed)
        return 0

    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from overheard.decoder import load_decoder as load_model
    from overheard.textonly.memory import CaptionMemory

    src = os.path.join(a.bench, "decoders", a.decoder)
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    os.makedirs(os.path.join(a.out, "clap"))
    for f in CLAP_FILES:
        if f == "model.safetensors":  # float16 on disk; ClapEncoder casts the model to float32
            st = load_file(os.path.join(a.clap, f))
            save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in st.items()},
                      os.path.join(a.out, "clap", f), metadata={"format": "pt"})
        else:
            shutil.copy2(os.path.join(a.clap, f), os.path.join(a.out, "clap", f))
    dec = os.path.join(a.out, "decoder")
    os.makedirs(dec)
    for f in os.listdir(src):
        if f.endswith((".json", ".txt")) and f not in ("train_summary.json",):
            shutil.copy2(os.path.join(src, f), os.path.join(dec, f))
    state = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in state.items()},
              os.path.join(dec, "model.safetensors"), metadata={"format": "pt"})
    mem = CaptionMemory.load(src)
    seen, keep = set(), []
    for i, c in enumerate(mem.captions):
        if c not in seen:
            seen.add(c)
            keep.append(i)
    small = CaptionMemory(mem.embeddings[keep].half(), [mem.captions[i] for i in keep])
    small.embeddings = small.embeddings.half()  # stored as float16; CaptionMemory.load -> float32
    small.save(dec)
    with open(os.path.join(src, "train_summary.json")) as f:
        summ = json.load(f)
    slim = {k: summ[k] for k in ("config", "captions", "vocab_size", "params", "seconds")}
    slim["final_loss"] = summ["history"][-1]["loss"] if summ["history"] else None
    with open(os.path.join(dec, "train_summary.json"), "w") as f:
        json.dump(slim, f, indent=1)

    # same captions from the float16 copy as from the float32 original, on the held-out clips
    ref_model, _ = load_model(src)
    new_model, _ = load_model(dec)
    emb = _test_embeddings(a.bench)
    with torch.no_grad():
        x = torch.from_numpy(emb)
        c32 = [c for c, _ in ref_model.generate(x, method="beam", num_beams=3)]
        c16 = [c for c, _ in new_model.generate(x, method="beam", num_beams=3)]
    same = float(np.mean([p == q for p, q in zip(c32, c16)]))
    # float16 CLAP: embeddings of held-out audio vs the float32 original
    import glob

    import soundfile as sf

    from overheard.clap import ClapEncoder
    wavs = sorted(glob.glob(os.path.join(a.bench, "world", "test", "*.flac")))[:30]
    audio = np.stack([sf.read(w, dtype="float32")[0] for w in wavs])
    e32 = ClapEncoder(a.clap).embed_audio(audio)
    e16 = ClapEncoder(os.path.join(a.out, "clap")).embed_audio(audio)
    clap_cos = float(np.min(np.sum(e32 * e16, axis=1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e16, axis=1)))
    with torch.no_grad():
        k32 = [c for c, _ in ref_model.generate(torch.from_numpy(e32), method="beam", num_beams=3)]
        k16 = [c for c, _ in new_model.generate(torch.from_numpy(e16), method="beam", num_beams=3)]
    clap_same = float(np.mean([p == q for p, q in zip(k32, k16)]))
    print(f"float16 CLAP: min cosine to float32 embeddings {clap_cos:.5f} on {len(wavs)} held-out clips; "
          f"end-to-end captions identical {clap_same:.1%}")
    sizes = {}
    for root, _, files in os.walk(a.out):
        for f in files:
            p = os.path.join(root, f)
            sizes[os.path.relpath(p, a.out)] = os.path.getsize(p)
    total = sum(sizes.values())
    print(f"float16 decoder: {same:.1%} of {len(c32)} held-out captions identical to float32")
    print(f"memory: {len(small)} distinct of {len(mem)} captions")
    print(f"{a.out}: {total / 1e6:.2f} MB")
    for k, v in sorted(sizes.items()):
        print(f"  {k:<40} {v / 1e3:8.1f} kB")
    write_audio_stats(a.out, a.stats_train, a.stats_calibration, a.world_seed)
    with open(os.path.join(a.out, "build_info.json"), "w") as f:
        json.dump({"decoder": a.decoder, "strategy": a.strategy, "fp16_caption_agreement": same,
                   "fp16_clap_min_cosine": clap_cos, "fp16_end_to_end_caption_agreement": clap_same,
                   "memory_distinct": len(small), "memory_total": len(mem), "bytes": total}, f, indent=1)
    return 0


def world_embeddings(clap_dir: str, split: str, n: int, world_seed: int = 0, batch: int = 20):
    """CLAP audio embeddings (n, D) of the first ``n`` scenes of a sound-world split."""
    import numpy as np

    from overheard import soundworld as sw
    from overheard.clap import ClapEncoder

    enc = ClapEncoder(clap_dir)
    out = []
    for b in range(0, n, batch):
        audio = np.stack([sw.make_scene(sw.clip_seed(world_seed, split, i))[0]
                          for i in range(b, min(n, b + batch))])
        out.append(enc.embed_audio(audio))
    return np.concatenate(out)


def write_audio_stats(model_dir: str, n_train: int, n_cal: int, world_seed: int = 0) -> None:
    """decoder/audio_stats.safetensors for the model in ``model_dir`` (README "Confidence"):
    statistics of the training split, calibrated on split "confidence" (no model trains on it)."""
    import time

    from overheard.confidence import AudioStats

    t = time.time()
    clap = os.path.join(model_dir, "clap")
    st = AudioStats.fit(world_embeddings(clap, "train", n_train, world_seed),
                        world_embeddings(clap, "confidence", n_cal, world_seed))
    path = st.save(os.path.join(model_dir, "decoder"))
    print(f"{path}: {n_train} training + {n_cal} calibration scenes, d50 {st.d50:.3f} "
          f"d95 {st.d95:.3f}, {os.path.getsize(path) / 1e3:.1f} kB, {time.time() - t:.0f} s")
    info_path = os.path.join(model_dir, "build_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        info["confidence_stats"] = {"n_train": n_train, "n_calibration": n_cal, "d50": round(st.d50, 4),
                                    "d95": round(st.d95, 4), "ridge": st.ridge}
        with open(info_path, "w") as f:
            json.dump(info, f, indent=1)


def _test_embeddings(bench: str, n: int = 150):
    """Audio embeddings of the benchmark's held-out clips (its plain-decoder caption table), or of
    training clips while that does not exist yet."""
    import glob

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("test-none-plain", "train-audio"):
        parts = sorted(glob.glob(os.path.join(bench, "captions", sub, "captions", "*.parquet")))
        if parts:
            break
    t = pa.concat_tables([pq.read_table(p, columns=["audio_embedding"]) for p in parts])
    dim = t.schema.field("audio_embedding").type.list_size
    return t.column("audio_embedding").combine_chunks().flatten().to_numpy(
        zero_copy_only=False).reshape(-1, dim).astype(np.float32)[:n]


if __name__ == "__main__":
    sys.exit(main())
