"""Hugging Face Hub model references -> local directories, through huggingface_hub's own cache.

Accepted forms (everything else is a path or fsspec URL and passes through untouched):
    org/name                  a bare repo id (only when no local path of that name exists)
    org/name@revision         a branch, tag or commit
    hf://org/name[@rev][/sub/dir]   the same, optionally a folder inside the repo
    hf://models/org/name...   the hub's own URL spelling (model repos only)

``resolve`` returns the folder inside the cached snapshot (``HF_HUB_CACHE`` /
``HF_HOME/hub`` / ``~/.cache/huggingface/hub``: models--org--name/snapshots/<sha>/...).
Offline (``HF_HUB_OFFLINE=1``) a warm cache is enough; a cold one raises ``HubNotCached``, one
line naming the repo and HF_HUB_OFFLINE, before any work. ``pin`` turns a reference into
``hf://org/name@<commit>[/sub]`` so every actor of a job reads the same snapshot even if the
branch moves mid-run. The environment is read at call time (huggingface_hub reads it at import),
so a job and its tests may point ``HF_HUB_CACHE`` elsewhere. No Ray, no torch.
"""

from __future__ import annotations

import os
import re

# HF's repo-id rule: 1-96 chars of [A-Za-z0-9_.-] per part, not starting with '.' or '-'
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_BARE = re.compile(rf"^({_PART})/({_PART})(?:@([A-Za-z0-9_./-]+))?$")
_URI = re.compile(rf"^hf://(?:models/)?({_PART})/({_PART})(?:@([A-Za-z0-9_.-]+))?(?:/(.*))?$")


class HubNotCached(FileNotFoundError):
    """An offline run asked for a repo (or revision) that the local hub cache lacks."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return os.path.join(home, "hub")


def parse(ref: str) -> tuple[str, str, str] | None:
    """(repo_id, revision or "", folder inside the repo or "") for a hub reference, else None.
    A bare ``org/name`` that exists as a local path is a path, not a repo id."""
    if not isinstance(ref, str):
        return None
    m = _URI.match(ref)
    if m:
        return f"{m.group(1)}/{m.group(2)}", m.group(3) or "", (m.group(4) or "").strip("/")
    if "://" in ref or ref.startswith((".", "/", "~")) or os.path.exists(ref):
        return None
    m = _BARE.match(ref)
    if m:
        return f"{m.group(1)}/{m.group(2)}", m.group(3) or "", ""
    return None


def model_ref(ref: str) -> str:
    """A model argument as given -> ``hf://`` URI when it is a hub reference, else unchanged.
    Jobs call this on every model path they take, so ``org/name`` never reaches code that would
    read it as a relative path (``storage.join(model, "clap")``)."""
    p = parse(ref)
    if p is None or ref.startswith("hf://"):
        return ref
    repo, revision, _ = p
    return f"hf://{repo}" + (f"@{revision}" if revision else "")


def _snapshot(repo: str, revision: str, sub: str) -> str:
    """Local snapshot root of ``repo`` at ``revision`` holding at least ``sub`` (downloads it
    unless offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{repo}@{revision}" if revision else repo
    try:
        return snapshot_download(
            repo, revision=revision or None, cache_dir=cache_dir(),
            local_files_only=_offline(),
            allow_patterns=[sub, f"{sub}/*"] if sub else None)  # fnmatch: * spans /
    except LocalEntryNotFoundError:
        raise HubNotCached(
            f"Hugging Face repo {where} is not in the local hub cache ({cache_dir()}) and "
            f"HF_HUB_OFFLINE=1 forbids downloading it: run once with network access (unset "
            f"HF_HUB_OFFLINE) or `hf download {repo}`, or pass a local directory") from None
    except Exception as e:  # RepositoryNotFound, RevisionNotFound, network errors
        raise FileNotFoundError(f"Hugging Face repo {where}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None


def resolve(ref: str) -> str:
    """Local path for a hub reference (see module doc); any other string is returned as is."""
    p = parse(ref)
    if p is None:
        return ref
    repo, revision, sub = p
    root = _snapshot(repo, revision, sub)
    return os.path.join(root, *sub.split("/")) if sub else root


def pin(ref: str) -> str:
    """``hf://org/name@<commit>[/sub]`` for a hub reference (resolving branch/tag to the commit
    cached or downloaded now); any other string is returned as is."""
    p = parse(ref)
    if p is None:
        return ref
    repo, revision, sub = p
    sha = os.path.basename(os.path.normpath(_snapshot(repo, revision, sub)))
    return f"hf://{repo}@{sha}" + (f"/{sub}" if sub else "")


__all__ = ["HubNotCached", "cache_dir", "parse", "model_ref", "resolve", "pin"]
