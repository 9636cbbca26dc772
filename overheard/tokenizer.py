"""Tokenizers trained offline with the ``tokenizers`` package (no hub downloads).

Byte-level BPE with RoBERTa-style special tokens, so the same file serves a CLAP text tower
(``RobertaTokenizerFast`` semantics: <s> ... </s>, pad id 1) and the caption decoder.
Saved as a single ``tokenizer.json`` (+ ``tokenizer_config.json``) in a model directory.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa order


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``. Deterministic for the same texts and size."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t.lower().strip() for t in texts], trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>",
        model_max_length=77,
    )


def load_tokenizer(directory: str) -> PreTrainedTokenizerFast:
    """Load the ``tokenizer.json`` of a model directory (local path)."""
    return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
