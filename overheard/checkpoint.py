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


# Bounds on size fields of a model's config.json, checked before anything is built: a config
# claiming 10^9 layers or a 10^7-wide hidden size must be refused, not allocated (or, for a
# meta-device model, not looped over for hours). Real CLAP / GPT-2 sizes are far below them:
# HTSAT-base depths [2,2,12,2], RoBERTa 12 layers x 768, vocab 50265, 514 positions.
MAX_CONFIG_INT = 1 << 20
MAX_LAYERS = 256


def check_config_sizes(config: dict, where: str) -> None:
    """ValueError naming the field when an integer anywhere in ``config`` (nested dicts / lists)
    is above MAX_CONFIG_INT or below -1, or a layer count (a key holding "layers" or "depths")
    adds up to more than MAX_LAYERS."""
    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
        elif isinstance(node, int) and not isinstance(node, bool):
            yield path, node

    layers: dict[str, int] = {}
    for path, v in walk(config, ""):
        if v > MAX_CONFIG_INT or v < -1:
            raise ValueError(f"{where}: {path} = {v} is out of range [-1, {MAX_CONFIG_INT}]")
        key = path.split("[")[0]
        if key.rsplit(".", 1)[-1].endswith(("layers", "depths")):
            layers[key] = layers.get(key, 0) + v
    for key, n in layers.items():
        if n > MAX_LAYERS:
            raise ValueError(f"{where}: {key} = {n} layers (at most {MAX_LAYERS})")


def safetensors_shapes(paths) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the headers of safetensors files (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[int, ...]] = {}
    for p in paths:
        try:
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    found[k] = tuple(f.get_slice(k).get_shape())
        except SafetensorError as e:
            raise ValueError(f"{p}: not a valid safetensors file ({e})") from None
    return found


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], where: str,
                  ignorable: set[str] = frozenset()) -> None:
    """ValueError naming missing tensors, unexpected ones (except ``ignorable``: buffers the
    model recomputes) and shape mismatches between a model's state dict and its weight file."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(ignorable))
    if missing:
        problems.append(f"missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                        f" ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected[:5]}"
                        f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    for k in sorted(set(expected) & set(found)):
        if tuple(expected[k]) != tuple(found[k]):
            problems.append(f"shape mismatch for {k}: file {list(found[k])}, config expects "
                            f"{list(expected[k])}")
    if problems:
        raise ValueError(f"{where}: weights do not match the config: " + "; ".join(problems[:8]))
