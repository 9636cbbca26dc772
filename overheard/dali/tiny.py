"""Tiny random-weight LLaVA-class captioners in the real Hugging Face format.

No weights can be downloaded where overheard is built and tested, so the DALI code paths run
against a ``LlavaForConditionalGeneration`` of the same class as llava-hf/llava-1.5-7b-hf
(CLIP vision tower -> 2-layer GELU projector -> Llama LM), shrunk: a 32x32 image cut into 8x8
patches gives 16 vision tokens (LLaVA-1.5: 336/14 = 24^2 = 576) of width 32 (1024), a 2-layer
Llama of width 64 (4096). The directory is what ``save_pretrained`` writes for the real model
(config.json, model.safetensors, tokenizer files, processor and image-processor configs), so
``overheard.dali.llava.load_llava`` reads both the same way.
"""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          PreTrainedTokenizerFast)

from overheard.tiny import SOUND_SENTENCES

# Llama's special-token order: <unk>=0, <s>=1, </s>=2; LLaVA adds <image> (and <pad>) at the end.
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
PROMPT_WORDS = ["USER: ASSISTANT: What sound can be heard in this scene ?",
                "What can you see? Answer concisely.", "Describe the sound."]


def train_llava_tokenizer(texts, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama's specials; encodes as ``<s> text`` (BOS only, as Llama does)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAVA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=512, padding_side="left")


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                       pad_token_id=pad_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=16)


def build_tiny_llava(directory: str | os.PathLike, seed: int = 0, extra_texts=()) -> str:
    """Write a random-weight LLaVA-1.5-format directory; byte-identical for the same seed.
    ~1 MB on disk. ``extra_texts`` join the tokenizer's training text (e.g. caption vocabularies)."""
    directory = str(directory)
    tok = train_llava_tokenizer(list(SOUND_SENTENCES) + PROMPT_WORDS + list(extra_texts))
    cfg = tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"),
                            tok.convert_tokens_to_ids("<pad>"))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # transformers' init sets norms to 1/0 and N(0, 0.02) elsewhere: a 2-layer LM then emits
        # the same token for any input. Wider weights make captions depend on the visual tokens,
        # so a test can tell audio-only from audio+image and a wrong token order.
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15, generator=g)
            elif name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight")):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    # The keys CLIPImageProcessor writes for llava-1.5 (shortest edge, centre crop, CLIP mean/std).
    # Written by hand: transformers 5's CLIPImageProcessor needs torchvision + PIL, which overheard
    # does not install (frames are resized by overheard.dali.llava.ImagePreprocess in torch).
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
                   "do_resize": True, "size": {"shortest_edge": 32}, "resample": 3,
                   "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True},
                  f, indent=2, sort_keys=True)
    return directory


def build_tiny_dali(directory: str | os.PathLike, seed: int = 0):
    """The caption job's ``--model DIR`` layout with tiny random models: DIR/clap (tiny CLAP,
    ``overheard.tiny``), DIR/llava (:func:`build_tiny_llava`), DIR/dali (an untrained DALI
    checkpoint naming both, ``new_dali``); all three seeded by ``seed``. Returns the loaded
    ``DaliModel`` of DIR/dali."""
    from overheard.dali.model import new_dali
    from overheard.tiny import build_tiny_clap

    clap, llava, dali = (os.path.join(str(directory), n) for n in ("clap", "llava", "dali"))
    build_tiny_clap(clap, seed=seed)
    build_tiny_llava(llava, seed=seed)
    return new_dali(dali, clap, llava, seed=seed)


__all__ = ["build_tiny_dali", "build_tiny_llava", "train_llava_tokenizer", "tiny_llava_config"]
