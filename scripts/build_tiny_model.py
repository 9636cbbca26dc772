"""Build overheard/assets/tiny-random-model in the job's layout: a tiny random-weight CLAP
plus a tiny random decoder. Captions carry no meaning; it is the cheapest model that runs
every path (framework-overhead benchmarks).
    .venv/bin/python scripts/build_tiny_model.py [--out DIR]
"""

import os
import shutil
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overheard.clap import ClapEncoder  # noqa: E402
from overheard.tiny import build_tiny_decoder  # noqa: E402
from overheard.tiny import build_tiny_clap  # noqa: E402
from jobs.caption_config import TINY_MODEL  # noqa: E402
from jobs.config_cli import parse  # noqa: E402


@dataclass
class TinyModelConfig:
    out: str = field(default=TINY_MODEL, metadata={"help": "model directory to (re)write"})


def main(argv=None):
    a = parse(TinyModelConfig, argv, "build_tiny_model.py", __doc__.splitlines()[0])
    shutil.rmtree(a.out, ignore_errors=True)
    build_tiny_clap(os.path.join(a.out, "clap"), seed=0)
    dim = ClapEncoder(os.path.join(a.out, "clap")).embedding_dim
    build_tiny_decoder(os.path.join(a.out, "decoder"), embedding_dim=dim, seed=0)
    print(f"default model written to {a.out}")


if __name__ == "__main__":
    main()
