"""The frozen vision-language captioner (LLaVA-class) behind a batched, prompt-level API.

A model path is an HF-format ``LlavaForConditionalGeneration`` directory (llava-hf/llava-1.5-7b-hf
as published, or ``overheard.dali.tiny.build_tiny_llava``), local or any fsspec URL (``s3://``:
copied once into the node's cache by ``storage.localize``). Only safetensors are read.

DALI never lets the LM see raw text with an ``<image>`` placeholder; it assembles input embeddings
itself, because the visual slot may hold image tokens, aligned audio tokens, or both:

    [<s>] [16 learned prefix tokens] ["USER: "] [visual tokens ...] ["\\n<prompt> ASSISTANT:"]

(LLaVA-1.5's template ``USER: <image>\\n{prompt} ASSISTANT:`` split at ``<image>``). Rows of a
batch share the prompt and the visual layout, so they have equal lengths and need no padding:
batch generation is exact, not approximately equal to batch-1 generation.

Images: ``ImagePreprocess`` re-implements CLIPImageProcessor (shortest-edge bicubic resize, centre
crop, rescale, CLIP mean/std) in torch from the directory's ``preprocessor_config.json``;
transformers 5's own processor needs torchvision and PIL, which overheard does not install.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from overheard import storage
from overheard.checkpoint import safetensors_weights

LLAVA15_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
DALI_PROMPT = "What sound can be heard in this scene ?"  # the seed's prompt, kept verbatim


class ImagePreprocess(torch.nn.Module):
    """uint8 frames (B, H, W, 3) RGB -> pixel_values (B, 3, S, S) float, as CLIPImageProcessor."""

    def __init__(self, cfg: dict):
        super().__init__()
        size = cfg.get("size", {})
        self.short = int(size.get("shortest_edge", size.get("height", 336)))
        crop = cfg.get("crop_size", {"height": self.short, "width": self.short})
        self.crop = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop),) * 2
        self.scale = float(cfg.get("rescale_factor", 1 / 255))
        mean = cfg.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        std = cfg.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        if min(h, w) != self.short:
            r = self.short / min(h, w)
            x = F.interpolate(x, size=(max(self.short, round(h * r)), max(self.short, round(w * r))),
                              mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
        h, w = x.shape[-2:]
        ch, cw = self.crop
        top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
        x = x[..., top:top + ch, left:left + cw]
        return (x * self.scale - self.mean) / self.std


@dataclass
class Generated:
    caption: str
    logprob: float  # mean log-probability (temperature 1) of the emitted tokens
    n_tokens: int


def _fingerprint(local: str) -> str:
    """Short id from config.json and the weight files' names and sizes: hashing 14 GB of
    LLaVA-7B weights would add ~30 s to every actor start."""
    with open(os.path.join(local, "config.json")) as f:
        text = f.read()
    sizes = sorted((n, os.path.getsize(os.path.join(local, n))) for n in os.listdir(local)
                   if n.endswith(".safetensors"))
    return storage.short_hash(text + repr(sizes), 12)


class FrozenLlava:
    """A LLaVA-class model loaded once, frozen, with the pieces DALI needs.

    ``vision_tokens(frames)``: (B, Nv, Dv) vision-tower features the projector consumes (layer
    ``vision_feature_layer``, CLS dropped for the "default" strategy) — the alignment target.
    ``project(tokens)``: the model's own projector, (B, N, Dv) -> (B, N, H) LM embeddings.
    ``inputs(visual, prefix)``: the full input embeddings for a batch (see module docstring).
    ``generate(embeds, ...)``: batched greedy or seeded per-row sampling with a KV cache.
    ``nll(embeds, texts)``: mean token NLL of target texts after the inputs (prefix tuning,
    distillation).
    """

    def __init__(self, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 prompt: str = DALI_PROMPT, template: str = LLAVA15_TEMPLATE):
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        local = storage.localize(path)
        if not any(f.endswith(".safetensors") for f in os.listdir(local)):
            safetensors_weights(local)  # raises, naming any pickle checkpoint found instead
        self.path, self.device, self.dtype = path, torch.device(device), dtype
        self.model = LlavaForConditionalGeneration.from_pretrained(
            local, dtype=dtype, local_files_only=True, use_safetensors=True).to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
        with open(os.path.join(local, "preprocessor_config.json")) as f:
            self.preprocess = ImagePreprocess(json.load(f)).to(self.device)
        cfg = self.model.config
        self.layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy
        self.vision_dim = int(cfg.vision_config.hidden_size)
        self.lm_dim = int(cfg.text_config.hidden_size)
        self.image_size = self.preprocess.crop[0]
        self.eos = self.tokenizer.eos_token_id
        self.set_prompt(prompt, template)
        self.model_id = f"{os.path.basename(path.rstrip('/')) or 'llava'}-{_fingerprint(local)}"

    # -- prompt -------------------------------------------------------------------------------
    def set_prompt(self, prompt: str, template: str = LLAVA15_TEMPLATE) -> None:
        if template.count("<image>") != 1:
            raise ValueError(f"template needs exactly one <image> slot: {template!r}")
        before, after = template.format(prompt=prompt).split("<image>")
        ids_b = self.tokenizer(before, add_special_tokens=True).input_ids  # starts with <s>
        if ids_b and ids_b[0] == self.tokenizer.bos_token_id:
            self.bos_ids, ids_b = ids_b[:1], ids_b[1:]
        else:
            self.bos_ids = []
        self.before_ids = ids_b
        self.after_ids = self.tokenizer(after, add_special_tokens=False).input_ids
        self.prompt, self.template = prompt, template

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(t)

    # -- vision -------------------------------------------------------------------------------
    def vision_tokens(self, frames) -> torch.Tensor:
        """frames: uint8 (B, H, W, 3) numpy/torch -> float (B, Nv, Dv) in the model dtype."""
        x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
        pv = self.preprocess(x.to(self.device)).to(self.dtype)
        out = self.model.model.vision_tower(pv, output_hidden_states=True)
        layers = self.layer if isinstance(self.layer, (list, tuple)) else [self.layer]
        h = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        return h[:, 1:] if self.strategy == "default" else h

    def project(self, tokens: torch.Tensor, projector: torch.nn.Module | None = None) -> torch.Tensor:
        return (projector or self.model.model.multi_modal_projector)(tokens.to(self.dtype))

    # -- inputs ---------------------------------------------------------------------------------
    def inputs(self, visual: list[torch.Tensor], prefix: torch.Tensor | None = None) -> torch.Tensor:
        """visual: LM-space segments, each (B, Ni, H), placed in order in the image slot;
        prefix: (P, H) learned tokens after <s>. Returns (B, L, H)."""
        b = visual[0].shape[0]
        parts = [self._embed_ids(self.bos_ids)]
        if prefix is not None:
            parts.append(prefix.to(self.dtype))
        parts.append(self._embed_ids(self.before_ids))
        head = torch.cat(parts).unsqueeze(0).expand(b, -1, -1)
        tail = self._embed_ids(self.after_ids).unsqueeze(0).expand(b, -1, -1)
        return torch.cat([head, *[v.to(self.dtype) for v in visual], tail], dim=1)

    # -- text -----------------------------------------------------------------------------------
    def _lm(self, embeds, past=None):
        out = self.model.model.language_model(inputs_embeds=embeds, past_key_values=past,
                                              use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1]).float(), out.past_key_values

    @torch.inference_mode()
    def generate(self, embeds: torch.Tensor, max_new_tokens: int = 30, temperature: float = 0.0,
                 seeds: list[int] | None = None) -> list[Generated]:
        """Greedy when temperature == 0 (the default: deterministic). Otherwise each row samples
        from softmax(logits / temperature) with its own generator seeded by ``seeds[i]``, so a
        row's caption does not depend on which other rows share its batch."""
        b = embeds.shape[0]
        gens = None
        if temperature > 0:
            seeds = seeds if seeds is not None else list(range(b))
            gens = [torch.Generator(device="cpu").manual_seed(int(s) % (2 ** 63)) for s in seeds]
        logits, past = self._lm(embeds)
        out = torch.full((b, max_new_tokens), -1, dtype=torch.long)
        lp = torch.zeros(b, dtype=torch.float64)
        done = torch.zeros(b, dtype=torch.bool)
        n = torch.zeros(b, dtype=torch.long)
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1).cpu()
            if gens is None:
                tok = logp.argmax(-1)
            else:
                probs = torch.softmax(logits.cpu() / temperature, dim=-1)
                tok = torch.stack([torch.multinomial(probs[i], 1, generator=gens[i])[0]
                                   for i in range(b)])
            live = ~done
            out[live, t] = tok[live]
            lp[live] += logp[live].gather(1, tok[live, None]).squeeze(1).double()
            n[live] += 1
            done |= tok == self.eos
            if bool(done.all()):
                break
            logits, past = self._lm(self._embed_ids(tok.tolist()).unsqueeze(1), past)
        res = []
        for i in range(b):
            ids = [int(x) for x in out[i] if x >= 0 and x != self.eos]
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            res.append(Generated(text, float(lp[i] / max(int(n[i]), 1)), int(n[i])))
        return res

    def nll(self, embeds: torch.Tensor, texts: list[str], max_tokens: int = 40) -> torch.Tensor:
        """Mean NLL of ``texts`` (+ </s>) continuing ``embeds`` (B, L, H); differentiable w.r.t.
        whatever produced ``embeds`` (prefix, audio projection/projector)."""
        ids = [self.tokenizer(t, add_special_tokens=False).input_ids[:max_tokens] + [self.eos]
               for t in texts]
        n = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        tgt = torch.full((len(ids), n), -100, dtype=torch.long, device=self.device)
        inp = torch.full((len(ids), n), pad, dtype=torch.long, device=self.device)
        for i, x in enumerate(ids):
            tgt[i, :len(x)] = torch.tensor(x)
            inp[i, :len(x)] = torch.tensor(x)
        tok_emb = self.model.get_input_embeddings()(inp)
        full = torch.cat([embeds, tok_emb], dim=1)
        mask = torch.ones(full.shape[:2], dtype=torch.long, device=self.device)
        mask[:, embeds.shape[1]:] = (tgt != -100).long()  # right padding: never attended to
        h = self.model.model.language_model(inputs_embeds=full, attention_mask=mask).last_hidden_state
        # position L-1+j predicts caption token j
        logits = self.model.lm_head(h[:, embeds.shape[1] - 1:-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


__all__ = ["FrozenLlava", "ImagePreprocess", "Generated", "LLAVA15_TEMPLATE", "DALI_PROMPT"]
