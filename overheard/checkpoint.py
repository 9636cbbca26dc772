"""Checkpoint I/O shared by every model directory (caption decoder, audibility classifier, caption
memory, DALI heads, CLAP): a checkpoint is ``config.json`` + ``model.safetensors``.

One weights writer (``save_weights``), one checked weights reader (``read_weights``), and the
checks around them: weights are safetensors only (a directory holding only pickle checkpoints is
refused by name), config sizes are bounded before anything is built, tensor names and shapes
must match the config exactly."""

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


def model_id(uri: str, weight_files: list, default: str) -> str:
    """The one model-id scheme: basename of the model URI (``default`` when it has none; an
    ``hf://org/name@rev`` revision dropped) + the first 12 hex of sha256 over its weight files,
    so the same weights under the same name give the same id wherever they are stored."""
    import hashlib

    name = os.path.basename(str(uri).rstrip("/")).split("@")[0] or default
    h = hashlib.sha256()
    for f in weight_files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                h.update(block)
    return f"{name}-{h.hexdigest()[:12]}"


def save_weights(tensors: dict, uri: str | os.PathLike, metadata: dict | None = None) -> None:
    """The one weights writer: ``tensors`` (name -> tensor) as a safetensors file at ``uri``
    (local or s3://; written whole or not at all, ``overheard.storage.write_bytes_atomic``).

    ``metadata`` holds at most one key: safetensors writes metadata from a hash map, so two or
    more keys come out in a different order between runs and break byte-identical files."""
    from safetensors.torch import save

    from overheard import storage

    if metadata is not None and len(metadata) > 1:
        raise ValueError(f"safetensors metadata takes one key at most (byte-stable files), got {sorted(metadata)}")
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    storage.write_bytes_atomic(str(uri), data)


def read_weights(path: str | os.PathLike, expected: dict[str, tuple], ignorable: set[str] = frozenset()
                 ) -> dict:
    """The tensors of the safetensors file ``path`` after its header matched ``expected``
    (name -> shape, ``check_tensors``) and every tensor proved floating point; ValueError naming
    the file otherwise. Nothing is read before the names and shapes are known to fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_tensors(expected, safetensors_shapes([path]), str(path), ignorable)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    for k, t in state.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor {k} has dtype {t.dtype}, expected floating point")
    return state
