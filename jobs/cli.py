"""``overheard`` command: dispatches to the job modules (each also runs as ``python -m``)."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

COMMANDS = {
    "caption": ("jobs.caption", "caption an audio/video archive into Parquet"),
    "show": ("jobs.show", "print captions from an output folder"),
    "status": ("jobs.status", "what a caption run did or is doing (its live manifest)"),
    "timeline": ("jobs.timeline", "caption windows -> per-source timelines (SRT, WebVTT, JSONL)"),
    "index": ("jobs.index", "load caption tables into a search index (LanceDB), incrementally"),
    "search": ("jobs.search", "find windows by a text query (CLAP vectors + caption keywords)"),
    "serve": ("jobs.serve", "browse and listen: a local web page over captions, search and runs"),
    "export-opensearch": ("jobs.export", "caption tables -> OpenSearch/Elasticsearch _bulk NDJSON"),
    "embed-captions": ("training.embed_captions", "CLAP text embeddings of a caption corpus (cached)"),
    "train-decoder": ("training.decoder", "train the caption decoder on caption text only"),
    "estimate-gap": ("training.gap", "noise variance + gap vector from audio/caption samples"),
    "build-model": ("jobs.build_model", "CLAP + caption corpus -> model dir (clap/ decoder/ MODEL_CARD.md)"),
    "evaluate": ("jobs.evaluate", "score a caption table against references (BLEU, METEOR, CIDEr-D, ...)"),
    "train-audibility": ("training.audibility", "train the audibility classifier (audible vs not-audible sentences)"),
    "dali-tiny": ("jobs.cli:dali_tiny", "write a tiny random DALI model (clap/ llava/ dali/), no downloads"),
    "dali-prefix": ("training.dali_prefix", "DALI 1a: learn prefix tokens from (image, sound caption) pairs"),
    "dali-align": ("training.dali_align", "DALI 1b: align CLAP audio tokens with LLaVA vision tokens (MMD/OT)"),
    "dali-distill": ("training.dali_distill", "DALI 2: audio+image pseudo-captions -> tune the audio projector"),
}


@dataclass
class DaliTinyConfig:
    dir: str = field(metadata={"help": "local directory to write (clap/, llava/, dali/)"})
    seed: int = field(default=0, metadata={"min": 0, "help": "random seed of all three models"})


def dali_tiny(argv: list[str] | None = None) -> int:
    """``overheard dali-tiny DIR``: DIR/clap (tiny CLAP), DIR/llava (tiny LLaVA-1.5-format model),
    DIR/dali (an untrained DALI checkpoint naming both): the caption job's ``--model DIR`` layout,
    so the DALI training and captioning commands run on a fresh machine without downloads."""
    from jobs.config_cli import parse

    a = parse(DaliTinyConfig, argv, "overheard dali-tiny", dali_tiny.__doc__)
    from overheard.dali.tiny import build_tiny_dali

    m = build_tiny_dali(a.dir, seed=a.seed)
    print(f"tiny DALI model in {a.dir}: clap/ llava/ dali/ (audio tokens {m.cfg.audio_dim} -> vision "
          f"{m.cfg.vision_dim} -> LM {m.cfg.lm_dim}; image {m.llava.image_size}x{m.llava.image_size})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: overheard COMMAND [args]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<18} {help_}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, _, func = COMMANDS[argv[0]][0].partition(":")  # "module" -> module.main
    try:
        return getattr(importlib.import_module(module), func or "main")(argv[1:])
    except BrokenPipeError:  # `overheard status OUT --json | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, OSError) as e:
        # a mistyped path, a port in use, a bad model: one line, not a traceback
        # (OVERHEARD_TRACEBACK=1 shows it)
        if os.environ.get("OVERHEARD_TRACEBACK"):
            raise
        print(f"overheard {argv[0]}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
