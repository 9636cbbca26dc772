"""Tiny random-weight models in the real formats, for tests and the repo's embedded default model.

``build_tiny_clap(directory, seed=0, htsat="tiny-tiny")`` writes an HF-format ClapModel directory
(config.json, model.safetensors, preprocessor_config.json, tokenizer.json + tokenizer_config.json) that
``overheard.clap.ClapEncoder`` and ``transformers.ClapModel.from_pretrained`` load like a published
laion/clap-htsat-unfused. The tokenizer is trained offline on ``SOUND_SENTENCES``.

``build_tiny_decoder(directory, embedding_dim=32, seed=0)`` writes a caption-decoder directory
(``overheard.decoder`` format) whose tokenizer is trained on ``TINY_CAPTIONS``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

# ~50 short sound descriptions in the style of AudioCaps/Clotho captions: the tiny tokenizer's corpus.
SOUND_SENTENCES = [
    "a dog barks in the distance",
    "a dog barks repeatedly while a man talks",
    "birds chirp in the trees",
    "birds are singing as wind blows",
    "a car engine idles and then revs",
    "a car drives past on a wet road",
    "rain falls steadily on a tin roof",
    "heavy rain and thunder rumble",
    "a woman speaks over a loudspeaker",
    "a man speaks and a crowd laughs",
    "children shout and play in a playground",
    "a baby cries while a woman talks softly",
    "a door creaks open and slams shut",
    "footsteps on a wooden floor",
    "water runs from a faucet into a sink",
    "a stream flows over rocks",
    "ocean waves crash on the shore",
    "wind blows hard against a microphone",
    "a bell rings several times",
    "church bells chime in the distance",
    "a train horn blows as a train passes",
    "a train clacks along the tracks",
    "an airplane flies overhead",
    "a helicopter hovers nearby",
    "a siren wails as an ambulance passes",
    "a telephone rings and someone answers",
    "typing on a computer keyboard",
    "a clock ticks steadily",
    "an alarm clock beeps",
    "a cat meows loudly",
    "a rooster crows in the morning",
    "cows moo on a farm",
    "a horse trots on a paved road",
    "sheep bleat in a field",
    "frogs croak near a pond",
    "insects buzz on a summer night",
    "a bee buzzes close to the microphone",
    "a guitar is strummed gently",
    "a piano plays a slow melody",
    "drums play a fast rhythm",
    "a violin plays a high note",
    "people applaud and cheer",
    "a crowd murmurs in a large hall",
    "glass shatters on the floor",
    "a hammer strikes metal",
    "a chainsaw cuts through wood",
    "a vacuum cleaner runs",
    "a toilet flushes",
    "food sizzles in a frying pan",
    "a kettle whistles as water boils",
    "someone snores loudly",
    "a person coughs twice",
    "silence with faint background hum",
]

# (patch_embeds_hidden_size, depths, heads). The audio tower's input stays the real 1024x64 mel -> 256x256
# image, so only widths/depths shrink. "tiny-tiny": 8 -> 64 wide over 4 stages, ~80 k audio parameters.
HTSAT_SHAPES = {
    "tiny-tiny": (8, [1, 1, 1, 1], [1, 1, 2, 4]),
    "tiny": (96, [2, 2, 6, 2], [4, 8, 16, 32]),    # HTSAT-tiny (630k-audioset-best.pt), 28 M
    "base": (128, [2, 2, 12, 2], [4, 8, 16, 32]),  # HTSAT-base (music_speech_audioset_*.pt), 72 M
}


def tiny_clap_config(vocab_size: int, htsat: str = "tiny-tiny", projection_dim: int = 32,
                     fusion: bool = False) -> ClapConfig:
    """ClapConfig with a small RoBERTa text tower (hidden 32, 2 layers) and the named HTSAT shape;
    ``fusion``: laion's feature-fusion variant (aff_2d, as laion/clap-htsat-fused)."""
    embed, depths, heads = HTSAT_SHAPES[htsat]
    audio = dict(patch_embeds_hidden_size=embed, depths=depths, num_attention_heads=heads,
                 hidden_size=embed * 2 ** (len(depths) - 1), window_size=8, spec_size=256, num_mel_bins=64,
                 enable_fusion=fusion, fusion_type="aff_2d" if fusion else None, layer_norm_eps=1e-5,
                 aff_block_r=min(4, embed))
    text = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=80,  # 77 tokens + RoBERTa's offset of 2, +1
                type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return ClapConfig(text_config=text, audio_config=audio, projection_dim=projection_dim)


def build_tiny_clap(directory: str, seed: int = 0, htsat: str = "tiny-tiny", fusion: bool = False) -> str:
    """Write a random-weight ClapModel directory (HF format) and return ``directory``.

    Deterministic: the same seed gives a byte-identical model.safetensors. "tiny-tiny" is ~0.5 MB on disk.
    Weights: transformers' init, then every LayerNorm/BatchNorm weight, bias and running statistic and the
    relative position bias tables are perturbed (their inits are constants, which would make the network
    insensitive to some inputs and hide mapping bugs).
    """
    from overheard.clap import save_clap_model
    from overheard.tokenizer import train_bpe_tokenizer

    # 400: byte alphabet (256) + 5 specials + ~140 merges learned from the 53 sentences
    tok = train_bpe_tokenizer(SOUND_SENTENCES, vocab_size=400)
    config = tiny_clap_config(len(tok), htsat=htsat, fusion=fusion)
    torch.manual_seed(seed)
    model = ClapModel(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                mod.weight.add_(0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, torch.nn.BatchNorm2d) and name.endswith("audio_encoder.batch_norm"):
                # log-mel dB values of typical audio sit around -100..0 dB
                mod.running_mean.copy_(-40.0 + 5.0 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(400.0 * (0.5 + torch.rand(mod.running_var.shape, generator=g)))
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10,
                              fft_window_size=1024, frequency_min=50, frequency_max=14000,
                              truncation="fusion" if fusion else "rand_trunc", padding="repeatpad")
    save_clap_model(model.eval(), fe, tok, directory)
    return directory



# ---------------------------------------------------------------------------- tiny caption decoder
# ~50 short sound captions in the style of AudioCaps/Clotho: tokenizer corpus of the tiny model.
TINY_CAPTIONS = (
    "a dog barks while cars pass by",
    "rain falls steadily on a tin roof",
    "a man speaks over a crackling radio",
    "birds chirp in the distance as wind blows",
    "a woman laughs and a baby cries",
    "an engine idles and then revs loudly",
    "water trickles from a tap into a sink",
    "footsteps echo in a large empty hall",
    "a crowd cheers and applauds",
    "thunder rumbles during heavy rain",
    "a telephone rings several times",
    "a door creaks open and slams shut",
    "a train passes with a horn blowing",
    "people talk in a busy restaurant",
    "an alarm clock beeps repeatedly",
    "waves crash on a sandy beach",
    "a cat meows and purrs softly",
    "a helicopter flies overhead",
    "someone types quickly on a keyboard",
    "a child sings a short song",
    "music plays from a small speaker",
    "a siren wails as an ambulance drives past",
    "leaves rustle in a gentle breeze",
    "a hammer strikes metal repeatedly",
    "a motorcycle accelerates down a street",
    "a man coughs and clears his throat",
    "glass shatters on a hard floor",
    "a crow caws above a quiet field",
    "an airplane engine roars during takeoff",
    "a clock ticks in a silent room",
    "a woman speaks on a loudspeaker",
    "dishes clatter in a kitchen sink",
    "a stream flows over rocks",
    "a bell rings in a church tower",
    "insects buzz in warm summer air",
    "a vacuum cleaner runs on a carpet",
    "children play and shout in a playground",
    "a car horn honks in heavy traffic",
    "a fire crackles in a fireplace",
    "a person whistles a simple tune",
    "a drill whirs through wood",
    "sheep bleat on a windy hill",
    "a guitar is strummed slowly",
    "an old fan hums steadily",
    "a duck quacks near a pond",
    "paper is crumpled and torn",
    "a horse gallops on a dirt road",
    "a man snores loudly while sleeping",
    "a boat motor hums on the water",
    "applause fades as a speaker begins to talk",
    "a frog croaks at night near a lake",
    "a rooster crows early in the morning",
)


def build_tiny_decoder(directory: str | os.PathLike, embedding_dim: int = 32, seed: int = 0,
                       texts: list[str] | None = None, mapper: str = "mlp") -> Path:
    """Save a tiny random decoder in the real format (tests, embedded default model).

    2 layers x 32 wide, 2 heads, prefix 4, vocabulary from a BPE over ``texts`` (default
    ``TINY_CAPTIONS``, ~330 tokens).  ~55 K parameters -> ~220 KB of float32 weights, whole
    directory < 500 KB.  Byte-identical for the same arguments (seeded init, deterministic BPE,
    sorted JSON).  Returns the directory path.
    """
    from overheard.decoder import CaptionDecoder, DecoderConfig, save_decoder
    from overheard.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(list(texts) if texts is not None else list(TINY_CAPTIONS), vocab_size=512)
    cfg = DecoderConfig(embedding_dim=embedding_dim, prefix_length=4, mapper=mapper, mapper_layers=1,
                        n_layer=2, n_head=2, n_embd=32, vocab_size=len(tokenizer), max_caption_tokens=24,
                        dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CaptionDecoder(cfg, tokenizer)
    return save_decoder(model, tokenizer, directory, extra={"tiny": True, "seed": seed})


__all__ = ["build_tiny_clap", "build_tiny_decoder", "tiny_clap_config", "SOUND_SENTENCES", "HTSAT_SHAPES",
           "TINY_CAPTIONS"]
