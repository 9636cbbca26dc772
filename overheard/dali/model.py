"""The DALI captioner: CLAP audio tower -> learned projection into the LLaVA vision-token space ->
(the LLaVA projector, or its distilled audio copy) -> frozen LLaVA LM, with a learned prefix.

Why a CLAP audio tower (the paper uses CAV-MAE, which transformers does not ship): overheard
already loads and converts LAION-CLAP (HF dirs and original ``.pt`` files), its HTSAT token grid
(2 x 32 = 64 tokens per 10-s window) is a token *distribution* like CLIP's 576 patches, it was
trained on audio-text pairs so its tokens are semantically organised, and the same pass gives the
CLAP embedding the caption table and search index use.

Checkpoint (a directory, usually ``MODEL/dali``): ``config.json`` (``DaliConfig``) +
``model.safetensors`` holding only what DALI learns:
    audio_projection.*  (Da -> Dv MLP, stage 1b alignment; ``tower.*`` too if the tower was tuned)
    prefix              (P, H) learned prompt tokens (stage 1a prefix tuning)
    audio_projector.*   the LLaVA projector's audio copy (stage 2 distillation; starts as a copy)
``config.llava`` / ``config.clap`` name the frozen models: relative paths resolve against the
checkpoint directory (``../llava``), or absolute / ``s3://``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from safetensors.torch import load as load_weights

from overheard import storage
from overheard.checkpoint import read_config_json, safetensors_weights, save_weights
from overheard.clap import ClapEncoder
from overheard.dali.llava import DALI_PROMPT, LLAVA15_TEMPLATE, FrozenLlava, Generated

MODES = ("audio", "audio+image", "image")


@dataclass
class DaliConfig:
    llava: str = "../llava"
    clap: str = "../clap"
    audio_dim: int = 0        # CLAP audio tower width (768 HTSAT-tiny, 1024 base)
    vision_dim: int = 0       # LLaVA vision-tower width (1024 for CLIP ViT-L/336)
    lm_dim: int = 0           # LM width (4096 for LLaVA-1.5-7B)
    hidden: int = 0           # projection MLP hidden width; 0 = vision_dim
    prefix_tokens: int = 16   # the paper's 16 learned tokens
    use_prefix: bool = False  # set by prefix tuning; an untrained prefix is never fed to the LM
    tuned_tower: bool = False
    prompt: str = DALI_PROMPT
    template: str = LLAVA15_TEMPLATE
    max_new_tokens: int = 30
    history: list = field(default_factory=list)  # one entry per training stage run

    @classmethod
    def from_dict(cls, d: dict) -> "DaliConfig":
        known = {f.name for f in fields(cls)}
        if d.get("kind") != "dali":
            raise ValueError("config.json is not a DALI checkpoint (kind != 'dali')")
        return cls(**{k: v for k, v in d.items() if k in known})


class DaliHeads(torch.nn.Module):
    """Every parameter DALI trains; the CLAP tower and LLaVA stay frozen (unless ``tower`` is
    given: a CLAP audio tower being fine-tuned, saved under ``tower.*``)."""

    def __init__(self, cfg: DaliConfig, projector: torch.nn.Module):
        super().__init__()
        hid = cfg.hidden or cfg.vision_dim
        # 2-layer MLP: the paper's CAV-MAE ends in one linear 768 -> 1024 map on a tuned tower;
        # with a frozen tower an extra non-linear layer gives the projection room to reshape the
        # token distribution (measured on the tiny AV world: see tests/test_dali_training.py).
        self.audio_projection = torch.nn.Sequential(
            torch.nn.Linear(cfg.audio_dim, hid), torch.nn.GELU(), torch.nn.Linear(hid, cfg.vision_dim))
        g = torch.Generator().manual_seed(0)
        # prefix init: small random vectors at the scale of token embeddings (std ~0.02 in Llama)
        self.prefix = torch.nn.Parameter(0.02 * torch.randn(cfg.prefix_tokens, cfg.lm_dim, generator=g))
        self.audio_projector = copy.deepcopy(projector).float().requires_grad_(True)


def resolve(base: str, path: str) -> str:
    """``path`` relative to the checkpoint directory ``base`` unless absolute or a URL."""
    if "://" in path or os.path.isabs(path):
        return path
    return storage.join(base, path) if "://" in base else os.path.normpath(os.path.join(base, path))


def save_dali(directory: str, cfg: DaliConfig, heads: DaliHeads, tower: torch.nn.Module | None = None) -> None:
    """Write config.json + model.safetensors (local or s3://, atomically per file)."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()}
    if tower is not None:
        sd.update({f"tower.{k}": v.detach().float().cpu().contiguous() for k, v in tower.state_dict().items()})
    save_weights(sd, storage.join(directory, "model.safetensors"), metadata={"format": "pt"})
    d = {"kind": "dali", **asdict(cfg)}
    storage.write_bytes_atomic(storage.join(directory, "config.json"),
                               json.dumps(d, indent=2, sort_keys=True).encode())


def read_dali_config(directory: str) -> DaliConfig:
    _, d = read_config_json(storage.localize(directory), "config.json", "a DALI")
    return DaliConfig.from_dict(d)


def is_dali(directory: str) -> bool:
    return storage.exists(storage.join(directory, "config.json")) and _kind(directory) == "dali"


def _kind(directory: str) -> str | None:
    try:
        return json.loads(storage.read_bytes(storage.join(directory, "config.json"))).get("kind")
    except Exception:
        return None


class DaliModel:
    """Loaded once per actor / training worker: CLAP encoder, frozen LLaVA, learned heads.

    ``audio_tokens(windows)`` -> (B, Na, Dv) aligned audio tokens + CLAP embeddings;
    ``visual(windows, frames, mode)`` -> LM-space visual segments; ``caption(...)`` -> captions.
    """

    def __init__(self, directory: str | None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 cfg: DaliConfig | None = None, clap: str | None = None, llava: str | None = None,
                 seed: int = 0):
        self.directory = directory
        self.cfg = cfg or read_dali_config(directory)
        base = directory or "."
        self.clap_path = clap or resolve(base, self.cfg.clap)
        self.llava_path = llava or resolve(base, self.cfg.llava)
        self.device, self.dtype = torch.device(device), dtype
        self.clap = ClapEncoder(self.clap_path, device=device, dtype=dtype)
        self.clap.model.requires_grad_(False)
        self.llava = FrozenLlava(self.llava_path, device=device, dtype=dtype,
                                 prompt=self.cfg.prompt, template=self.cfg.template)
        c = self.cfg
        c.audio_dim, c.vision_dim, c.lm_dim = (self.clap.audio_token_dim, self.llava.vision_dim,
                                               self.llava.lm_dim)
        with torch.random.fork_rng():  # a seeded projection init that leaves the caller's RNG alone
            torch.manual_seed(seed)
            self.heads = DaliHeads(c, self.llava.model.model.multi_modal_projector)
        weights_id = "untrained"
        if directory is not None:  # a checkpoint always has weights; pickles are refused by name
            local = storage.localize(directory)
            with open(safetensors_weights(local), "rb") as f:
                raw = f.read()  # read once: parsed here and hashed into model_id
            sd = load_weights(raw)
            weights_id = hashlib.sha256(raw).hexdigest()[:12]
            tower = {k[6:]: v for k, v in sd.items() if k.startswith("tower.")}
            missing, unexpected = self.heads.load_state_dict(
                {k: v for k, v in sd.items() if not k.startswith("tower.")}, strict=False)
            if missing or unexpected:
                raise ValueError(f"{directory}: weights do not fit the models "
                                 f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
            if tower:
                self.clap.model.audio_model.load_state_dict(tower, strict=True)
        self.heads.to(self.device, dtype)
        self.heads.eval()
        self.model_id = "dali-" + storage.short_hash(
            f"{self.clap.model_id}|{self.llava.model_id}|{weights_id}", 12)

    # -- pieces the training scripts reuse --------------------------------------------------------
    def audio_tokens(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 windows (B, window_samples) -> (aligned tokens (B, Na, Dv), CLAP emb (B, E))."""
        x = torch.as_tensor(np.ascontiguousarray(windows) if isinstance(windows, np.ndarray) else windows,
                            device=self.device)
        tokens, emb = self.clap.audio_tokens(x)
        return self.heads.audio_projection(tokens.to(self.dtype)), emb

    def prefix(self) -> torch.Tensor | None:
        return self.heads.prefix if self.cfg.use_prefix else None

    def visual(self, audio_tok: torch.Tensor | None, frames=None) -> list[torch.Tensor]:
        """LM-space segments for the image slot: image tokens (LLaVA's projector) then audio tokens
        (the audio projector copy)."""
        seg = []
        if frames is not None:
            seg.append(self.llava.project(self.llava.vision_tokens(frames)))
        if audio_tok is not None:
            seg.append(self.llava.project(audio_tok, self.heads.audio_projector))
        return seg

    # -- inference --------------------------------------------------------------------------------
    @torch.inference_mode()
    def caption(self, windows, frames=None, temperature: float = 0.0, seeds: list[int] | None = None,
                max_new_tokens: int | None = None) -> tuple[list[Generated], np.ndarray]:
        """One batch of one mode: ``frames`` None -> audio only; else audio+image (same rows).
        Returns (captions, CLAP embeddings float32 (B, E))."""
        tok, emb = self.audio_tokens(windows)
        embeds = self.llava.inputs(self.visual(tok, frames), self.prefix())
        out = self.llava.generate(embeds, max_new_tokens or self.cfg.max_new_tokens, temperature, seeds)
        return out, emb.float().cpu().numpy()


def check_dali(directory: str) -> dict:
    """Validate a DALI model without loading LLaVA or CLAP weights (the caption job's driver may
    be a small CPU head node; LLaVA-7B is 14 GB): configs are read, the weight files' headers
    checked against the models' widths. Returns {clap, llava, image_size, window_s}. Raises
    ValueError naming what does not fit. Actors still load everything (and fail loudly) later."""
    from safetensors import safe_open

    cfg = read_dali_config(directory)
    clap, llava = resolve(directory, cfg.clap), resolve(directory, cfg.llava)

    def read_json(base, name, what):
        try:
            return json.loads(storage.read_bytes(storage.join(base, name)))
        except FileNotFoundError:
            raise ValueError(f"{what} at {base}: no {name}") from None

    lc = read_json(llava, "config.json", "LLaVA model")
    if not any(storage.exists(storage.join(llava, n)) for n in
               ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"LLaVA model at {llava}: no model.safetensors(.index.json); only "
                         "safetensors are read")
    pre = read_json(llava, "preprocessor_config.json", "LLaVA model")
    crop = pre.get("crop_size", pre.get("size", {}))
    image_size = int(crop["height"] if isinstance(crop, dict) and "height" in crop else
                     crop.get("shortest_edge", 336) if isinstance(crop, dict) else crop)
    vision_dim = int(lc["vision_config"]["hidden_size"])
    lm_dim = int(lc["text_config"]["hidden_size"])
    window_s, audio_dim = 10.0, None
    if not clap.endswith((".pt", ".pth", ".ckpt")):
        cc = read_json(clap, "config.json", "CLAP model")
        audio_dim = int(cc["audio_config"]["hidden_size"])
        if storage.exists(storage.join(clap, "preprocessor_config.json")):
            window_s = float(read_json(clap, "preprocessor_config.json", "CLAP model")
                             .get("max_length_s", 10))
    elif not storage.exists(clap):
        raise ValueError(f"CLAP checkpoint not found: {clap}")
    want = {"prefix": (cfg.prefix_tokens, lm_dim), "audio_projection.2.weight": (vision_dim, None),
            "audio_projector.linear_1.weight": (None, vision_dim),
            "audio_projector.linear_2.weight": (lm_dim, None),
            "audio_projection.0.weight": (None, audio_dim)}
    local = storage.localize(directory)
    with safe_open(str(safetensors_weights(local)), "pt") as f:
        keys = set(f.keys())
        for k, shape in want.items():
            if k not in keys:
                raise ValueError(f"{directory}: weights lack {k}")
            got = tuple(f.get_slice(k).get_shape())
            if any(w is not None and w != g for w, g in zip(shape, got)):
                raise ValueError(f"{directory}: {k} has shape {got}, the models need {shape} "
                                 f"(CLAP width {audio_dim}, vision width {vision_dim}, LM width {lm_dim})")
    return {"clap": clap, "llava": llava, "image_size": image_size, "window_s": window_s}


def new_dali(directory: str, clap: str, llava: str, prefix_tokens: int = 16, hidden: int = 0,
             prompt: str = DALI_PROMPT, seed: int = 0) -> DaliModel:
    """An untrained checkpoint (seeded projection init; projector copied from LLaVA), written to
    ``directory`` and returned loaded. Local model paths are stored relative to it."""
    def rel(p):
        if "://" in p or "://" in directory:
            return p
        return os.path.relpath(os.path.abspath(p), os.path.abspath(directory))

    cfg = DaliConfig(llava=rel(llava), clap=rel(clap), prefix_tokens=prefix_tokens, hidden=hidden,
                     prompt=prompt)
    m = DaliModel(None, cfg=cfg, clap=clap, llava=llava, seed=seed)
    m.directory = directory
    save_dali(directory, m.cfg, m.heads)
    return m


__all__ = ["DaliConfig", "DaliHeads", "DaliModel", "new_dali", "check_dali", "save_dali", "read_dali_config",
           "is_dali", "resolve", "MODES"]
