"""``overheard`` command: dispatches to the job modules (each also runs as ``python -m``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "caption": ("jobs.caption", "caption an audio/video archive into Parquet"),
    "show": ("jobs.show", "print captions from an output folder"),
    "index": ("jobs.index", "load caption tables into a search index (LanceDB), incrementally"),
    "search": ("jobs.search", "find windows by a text query (CLAP vectors + caption keywords)"),
    "export-opensearch": ("jobs.export", "caption tables -> OpenSearch/Elasticsearch _bulk NDJSON"),
    "embed-captions": ("jobs.embed_captions", "CLAP text embeddings of a caption corpus (cached)"),
    "train-decoder": ("training.decoder", "train the caption decoder on caption text only"),
    "estimate-gap": ("training.gap", "noise variance + gap vector from audio/caption samples"),
    "evaluate": ("jobs.evaluate", "score a caption table against references (BLEU, METEOR, CIDEr-D, ...)"),
    "train-audibility": ("training.audibility", "train the audibility classifier (audible vs not-audible sentences)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: overheard COMMAND [args]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<18} {help_}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    mod = importlib.import_module(COMMANDS[argv[0]][0])
    return mod.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
