"""Package the sound-world model that ships in overheard/assets/soundworld-model.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soundworld.py                 # trains + measures
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/build_soundworld_model.py --decoder noise

Takes the contrastively trained CLAP (build/soundworld-clap) and one text-only decoder of the
benchmark (build/bench-soundworld/decoders/<name>), and writes ``clap/`` + ``decoder/`` (the
caption job's model layout) + MODEL_CARD.md.  To stay a few MB the decoder weights and its caption
memory are stored as float16 (both loaders cast to float32; captions are checked to be unchanged
on the benchmark's held-out clips) and the memory keeps each distinct caption once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CLAP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default=os.path.join(ROOT, "build", "bench-soundworld"))
    ap.add_argument("--clap", default=os.path.join(ROOT, "build", "soundworld-clap"))
    ap.add_argument("--decoder", default="noise", help="decoder name under <bench>/decoders")
    ap.add_argument("--strategy", default="plain", help="the strategy the card recommends")
    ap.add_argument("--out", default=os.path.join(ROOT, "overheard", "assets", "soundworld-model"))
    a = ap.parse_args(argv)

    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from overheard.memory import CaptionMemory
    from overheard.retrieval import load_model

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
    with open(os.path.join(a.out, "build_info.json"), "w") as f:
        json.dump({"decoder": a.decoder, "strategy": a.strategy, "fp16_caption_agreement": same,
                   "fp16_clap_min_cosine": clap_cos, "fp16_end_to_end_caption_agreement": clap_same,
                   "memory_distinct": len(small), "memory_total": len(mem), "bytes": total}, f, indent=1)
    return 0


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
