"""Checks shared by the model-directory loaders (decoder, audibility classifier): weights are
safetensors only; a directory holding only pickle checkpoints is refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def safetensors_weights(directory: str | os.PathLike, name: str = WEIGHTS_NAME) -> Path:
    """``directory / name`` if it is a file, else ValueError: pickle checkpoints found there are
    named and refused (unpickling can run arbitrary code), otherwise the missing file is named."""
    d = Path(directory)
    weights = d / name
    if not weights.is_file():
        pickles = sorted(p.name for p in d.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(f"{directory}: found pickle checkpoint(s) {pickles} but no {name}; "
                             "only safetensors are accepted (unpickling can run arbitrary code)")
        raise ValueError(f"{directory}: missing {name}")
    return weights


def read_config_json(directory: str | os.PathLike, name: str, what: str) -> tuple[Path, dict]:
    """(path, parsed JSON) of ``directory / name``; ValueError naming the directory when the file
    is missing ("not a <what> directory") or the path when it is not valid JSON."""
    path = Path(directory) / name
    if not path.is_file():
        raise ValueError(f"{directory}: no {name}; not {what} directory")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
