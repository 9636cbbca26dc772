"""Build the embedded default model (overheard/assets/default-model) in the job's layout.

Until a sound-world-trained model ships (issue 4), this is a tiny random-weight CLAP plus a
tiny random decoder: it proves the whole path offline, its captions carry no meaning.
    .venv/bin/python scripts/build_default_model.py [--out DIR]
"""

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overheard.clap import ClapEncoder  # noqa: E402
from overheard.decoder import build_tiny_decoder  # noqa: E402
from overheard.tiny import build_tiny_clap  # noqa: E402
from jobs.caption import DEFAULT_MODEL  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=DEFAULT_MODEL)
    a = p.parse_args(argv)
    shutil.rmtree(a.out, ignore_errors=True)
    build_tiny_clap(os.path.join(a.out, "clap"), seed=0)
    dim = ClapEncoder(os.path.join(a.out, "clap")).embedding_dim
    build_tiny_decoder(os.path.join(a.out, "decoder"), embedding_dim=dim, seed=0)
    print(f"default model written to {a.out}")


if __name__ == "__main__":
    main()
