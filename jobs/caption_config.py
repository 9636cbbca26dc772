"""The caption job's options: one dataclass per group, shown as one group each in ``--help``.

    inputs     what to caption and with which model (INPUT, OUTPUT, --model, --limit, ...)
    windows    how sources are cut (--window, --hop, --whole-clip, ...)
    decoding   CLAP + text-only decoder models: --strategy, --search, --num-beams, ...
    guidance   audibility-guided decoding and caption scores (CLAP + decoder models)
    dali       DALI models: --mode, --sample-temperature, --max-new-tokens
    resources  actors, CPUs/GPUs, batches, the Ray cluster
    run        what is written and shown: --embeddings, --rows-per-part, --run-id, ...

Flags stay flat (``--num-beams``, not ``--decoding.num-beams``); ``CaptionConfig(input=...,
num_beams=5)`` and ``cfg.num_beams`` work as before, next to ``cfg.decoding.num_beams``. The
actors take the group they use (``Captioner(decoder, decoding=cfg.decoding, scoring=cfg.scoring,
...)``), so a new option is one field here plus the line in the actor that reads it.

Options that do not apply are refused with one line (exit 2) rather than ignored, when the user
set them (a value other than the default): guidance options without ``--guidance``, a decoding
temperature without ``--strategy projection`` (``validate`` methods, at parse time), and options of
the other kind of model once the model is known (:func:`refuse_for_model`, before any work).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import overheard
from jobs.blocks import UNKNOWN_BLOCK_BYTES, UNKNOWN_SOURCES
from jobs.config_cli import OptionError, changed, flag, flat_get, init_grouped

ASSETS = os.path.join(os.path.dirname(overheard.__file__), "assets")
# The embedded default: a tiny CLAP trained on the sound world + a text-only decoder (5.3 MB,
# overheard/assets/soundworld-model/MODEL_CARD.md). tiny-random-model is random weights: the
# cheapest model that exercises every path (benchmarks of framework overhead use it).
DEFAULT_MODEL = os.path.join(ASSETS, "soundworld-model")
TINY_MODEL = os.path.join(ASSETS, "tiny-random-model")
# actors.captioner.STRATEGIES (not imported: that module loads torch; a test keeps them equal)
STRATEGIES = ("plain", "nearest", "projection", "retrieval")


def _flags(names) -> str:
    return ", ".join(flag(n) for n in names)


@dataclass(frozen=True)
class InputConfig:
    input: str = field(metadata={"help": "folder/prefix, glob, single file, a manifest "
                                         ".parquet/.csv with a 'uri' column or a .jsonl (NeMo), "
                                         "WebDataset .tar/.tar.gz shards, Hugging Face Parquet "
                                         "with an 'audio' column (local or s3://)"})
    output: str = field(metadata={"help": "output folder/prefix (local or s3://)"})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "model directory holding clap/ (HF ClapModel dir) or clap.pt, and decoder/; or a "
                "DALI model: dali/ (config.json naming its CLAP and LLaVA) or a dali checkpoint dir. "
                "Local, s3://, or a Hugging Face repo id org/name[@rev] / hf://org/name[@rev][/dir] "
                "(resolved through the hub's cache; offline needs it cached)"})
    clap: str = field(default="", metadata={
        "help": "override the model's CLAP: HF ClapModel directory, original LAION-CLAP .pt "
                "checkpoint, or a Hugging Face repo id (laion/clap-htsat-unfused, org/name@rev, "
                "hf://...); CLAP + decoder models only"})
    decoder: str = field(default="", metadata={
        "help": "override the model's caption decoder directory (or hub id / hf:// URI); "
                "CLAP + decoder models only"})
    all_files: bool = field(default=False, metadata={
        "help": "list every file, not only known media extensions"})
    limit: int = field(default=0, metadata={
        "min": 0, "help": "caption at most this many new sources (0: all)"})
    max_duration: float = field(default=6 * 3600.0, metadata={
        "min": 0.0, "help": "sources longer than this (s) fail as too_long"})
    decode_timeout: float = field(default=1800.0, metadata={
        "min": 0.0, "help": "per-source decode limit (s), opening included"})


@dataclass(frozen=True)
class WindowConfig:
    # 600 s: one window is 115 MB of float32 at 48 kHz; CLAP itself sees 10 s
    window: float = field(default=10.0, metadata={"gt": 0.0, "max": 600.0,
                                                  "help": "window length, seconds (0 < w <= 600)"})
    hop: float = field(default=0.0, metadata={"min": 0.0, "max": 600.0,
                                              "help": "hop between window starts (0: = window)"})
    min_window: float = field(default=0.5, metadata={
        "min": 0.0,
        "help": "drop a trailing partial window shorter than this (a clip shorter than it "
                "still gets one window)"})
    pad_mode: str = field(default="repeatpad", metadata={
        "choices": ("repeatpad", "zeros"),
        "help": "repeatpad | zeros: how a window shorter than --window is filled"})
    whole_clip: float = field(default=0.0, metadata={
        "min": 0.0, "max": 600.0,
        "help": "S > 0: whole-clip windows: a source up to S s long is ONE window as long as the "
                "source (CLAP averages its 10-s chunks), e.g. 30 for Clotho's 15-30-s clips; "
                "longer sources are cut into S-s windows. Replaces --window/--hop"})

    def validate(self) -> None:
        if self.min_window > self.window:
            raise OptionError(f"--min-window {self.min_window} is longer than --window "
                              f"{self.window}")
        if self.whole_clip > 0:
            # effective_windows() sets both to S itself: only a user's own values are refused
            own = [n for n in changed(self) if n in ("window", "hop")
                   and getattr(self, n) != self.whole_clip]
            if own:
                raise OptionError(f"--whole-clip replaces --window/--hop; drop {_flags(own)}")


@dataclass(frozen=True)
class DecodingConfig:
    strategy: str = field(default="plain", metadata={
        "choices": STRATEGIES,
        "help": "plain (the audio embedding as is) | nearest (the closest caption embedding of "
                "the decoder's memory) | projection (a softmax mix of memory embeddings, see "
                "--temperature) | retrieval (the audio embedding plus its nearest memory "
                "embeddings; needs a decoder trained with --retrieval-k)"})
    search: str = field(default="beam", metadata={"choices": ("greedy", "beam"),
                                                  "help": "greedy | beam"})
    num_beams: int = field(default=3, metadata={"min": 1, "max": 64,
                                                "help": "beam width (--search beam)"})
    temperature: float = field(default=0.01, metadata={
        "gt": 0.0, "help": "softmax temperature of --strategy projection over memory "
                           "similarities (not the DALI --sample-temperature)"})
    min_confidence: float = field(default=0.0, metadata={
        "min": 0.0, "max": 1.0,
        "help": "windows whose confidence (0-1, column 'confidence') is below this keep their row "
                "with caption null and 'decoding' saying why; 0 = caption every window"})

    def validate(self) -> None:
        set_ = changed(self)
        if "temperature" in set_ and self.strategy != "projection":
            raise OptionError(f"--temperature applies only to --strategy projection (got "
                              f"--strategy {self.strategy})")
        if "num_beams" in set_ and self.search != "beam":
            raise OptionError("--num-beams applies only to --search beam (got --search "
                              f"{self.search})")


@dataclass(frozen=True)
class ScoringConfig:
    guidance: bool = field(default=False, metadata={
        "help": "audibility-guided decoding: re-rank candidates each step by w_lm*LM log-prob + "
                "w_clap*CLAP audio-text cosine + w_aud*log P(audible) (slower; overheard.guidance)"})
    guidance_weights: str = field(default="0.2,1,0.015", metadata={
        "help": "guidance: w_lm,w_clap,w_aud (the seed's lambda_0,lambda_1,lambda_2)"})
    guidance_candidates: int = field(default=5, metadata={"min": 1, "max": 1000, "help": (
        "guidance: candidate next tokens per beam per step")})
    guidance_mode: str = field(default="beam", metadata={
        "choices": ("beam", "topk"),
        "help": "guidance: beam (num_beams beams x candidates) | topk (one caption, candidates "
                "per step)"})
    score_captions: bool = field(default=False, metadata={
        "help": "without guidance, still fill clap_similarity/audibility of the plain captions "
                "(loads the CLAP text tower and the classifier into the captioner)"})
    audibility_model: str = field(default="", metadata={
        "help": "guidance or --score-captions: audibility classifier directory (local or s3://); "
                "'' = the shipped one, 'none' = no audibility term"})

    def validate(self) -> None:
        try:
            w = [float(x) for x in self.guidance_weights.split(",")]
        except ValueError:
            w = []
        if len(w) != 3 or not all(math.isfinite(x) for x in w):
            raise OptionError("--guidance-weights must be three finite numbers w_lm,w_clap,w_aud;"
                              f" got {self.guidance_weights!r}")
        set_ = changed(self)
        if not self.guidance:
            own = [n for n in set_ if n.startswith("guidance_")]
            if own:
                raise OptionError(f"{_flags(own)} without --guidance: add --guidance or drop "
                                  f"{'it' if len(own) == 1 else 'them'}")
            if "audibility_model" in set_ and not self.score_captions:
                raise OptionError("--audibility-model applies only with --guidance or "
                                  "--score-captions")


@dataclass(frozen=True)
class DaliConfig:
    mode: str = field(default="audio", metadata={
        "choices": ("audio", "audio+image"),
        "help": "audio | audio+image: DALI models also see the video frame at each window's "
                "midpoint (files without video fall back to audio); 'audio' decodes no frames"})
    sample_temperature: float = field(default=0.0, metadata={
        "min": 0.0, "max": 100.0,
        "help": "0 = greedy (deterministic); > 0 samples at this temperature with a "
                "per-window seed (the seed paper's reference samples at 0.2)"})
    max_new_tokens: int = field(default=0, metadata={
        "min": 0, "max": 4096, "help": "caption length cap (0: model's)"})


@dataclass(frozen=True)
class ResourceConfig:
    decode_cpus: float = field(default=0.5, metadata={"gt": 0.0, "help": "CPUs per decode task"})
    pack_sources: bool = field(default=True, metadata={
        "help": "decode small files several to a task (up to 4 MB / 32 files), largest first; "
                "off: one task per file in listing order"})
    unknown_size_sources: int = field(default=UNKNOWN_SOURCES, metadata={
        "min": 1,
        "help": "sources of unknown size (a manifest without a 'size' column) per decode block; "
                "larger blocks cost less framework per source (bench/scale.py (b)). Long files "
                "are safe: the decode task stats the block's sources first (a missing one fails "
                "as not_found unopened), decodes up to --unknown-block-bytes of them and defers "
                "the rest to a second round that packs them by their now known sizes"})
    unknown_block_bytes: int = field(default=UNKNOWN_BLOCK_BYTES, metadata={
        "min": 1,
        "help": "bytes of unknown-size sources a decode task decodes in the first round (the "
                "first source always); the rest of its block is deferred to the next round"})
    fuse_models: bool = field(default=True, metadata={
        "help": "run CLAP and the decoder in one actor pool (captioner_actors actors, batches "
                "of captioner_batch, CLAP in chunks of encoder_batch); off: two pools "
                "(CLAP + decoder models)"})
    decode_in_actors: bool = field(default=False, metadata={
        "help": "on a cluster without GPUs, each model actor (--captioner-actors, 0 = one per "
                "CPU) also decodes its blocks and writes their parts: no decode or writer "
                "tasks, no windows through the object store (fewest CPU-s per window with few "
                "actors, README 'Framework CPU per window'); ignored with GPUs, where decoding "
                "stays a stage of CPU tasks (--decode-cpus each)"})
    captioner_actors: int = field(default=0, metadata={
        "min": 0,
        "help": "most model actors; the pool autoscales between --min-actors and this. 0 = auto: "
                "one per GPU the cluster can offer (its autoscaler's limits included), or one per "
                "4 CPUs on a CPU-only cluster"})
    min_actors: int = field(default=1, metadata={
        "min": 1, "help": "model actors kept running (pool minimum)"})
    encoder_actors: int = field(default=0, metadata={
        "min": 0, "help": "most CLAP actors (--no-fuse-models only); 0 = auto, as "
                          "--captioner-actors"})
    actor_cpus: float = field(default=0.5, metadata={"min": 0.0,
                                                     "help": "CPUs reserved per model actor"})
    gpus_per_actor: float = field(default=-1.0, metadata={
        "min": -1.0,
        "help": "GPUs per model actor; -1: when the cluster has GPUs 1 per fused or DALI "
                "actor, 0.5 per actor of two pools (they share a card), else 0"})
    encoder_batch: int = field(default=16, metadata={
        "min": 1, "help": "windows per CLAP batch (CLAP + decoder models)"})
    captioner_batch: int = field(default=64, metadata={"min": 1,
                                                       "help": "windows per captioner batch"})
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16"),
                                                    "help": "float32 | bfloat16 (GPU)"})
    torch_threads: int = field(default=1, metadata={"min": 1,
                                                    "help": "intra-op threads per CPU actor"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster address ('' = local "
                                                           "or $RAY_ADDRESS)"})
    ray_progress: str = field(default="auto", metadata={
        "choices": ("auto", "on", "off"),
        "help": "auto | on | off: Ray Data's own progress bars and, for a local cluster, Ray's "
                "dashboard; auto = on when the job runs on a cluster (--ray-address or "
                "$RAY_ADDRESS, e.g. under ray job submit)"})

    def validate(self) -> None:
        if self.fuse_models and "encoder_actors" in changed(self):
            raise OptionError("--encoder-actors sizes the CLAP pool of --no-fuse-models; with "
                              "one fused pool use --captioner-actors")
        if self.decode_in_actors and not self.fuse_models:
            raise OptionError("--decode-in-actors decodes in the fused CLAP + decoder actor; "
                              "drop --no-fuse-models")


@dataclass(frozen=True)
class RunConfig:
    embeddings: bool = field(default=True, metadata={"help": "write audio_embedding column"})
    rows_per_part: int = field(default=50_000, metadata={
        "min": 1, "help": "commit written parts (one per decode block, written by workers) once "
                          "this many of their caption rows wait uncommitted"})
    flush_interval: float = field(default=60.0, metadata={
        "min": 0.0, "help": "commit written parts at least this often (s; 0: each part at once; "
                            "the first part is always committed at once): bounds work lost to a "
                            "kill of the driver"})
    run_id: str = field(default="", metadata={
        "help": "name of this run (parts, runs/<run>/); '' = a timestamp + random suffix"})
    lease_stale: float = field(default=120.0, metadata={"gt": 0.0, "help": (
        "a run holds OUTPUT/_lease.json, renewed every lease_stale/4 s; a second run on the same "
        "output refuses (exit 3) unless the lease's last heartbeat is older than this (s): a "
        "killed run blocks no longer")})
    show: int = field(default=20, metadata={
        "min": 0, "help": "print this many captions at the end"})
    progress: bool = field(default=True, metadata={
        "help": "the files/windows progress bar on stderr"})
    verbose: bool = field(default=False, metadata={
        "help": "show Ray's own notices (log records, the core worker's actor lines)"})


@dataclass(init=False)
class CaptionConfig:
    """All options of ``overheard caption``, by group. Build it flat (``CaptionConfig(input=...,
    output=..., window=5)``) or from groups (``CaptionConfig(inputs=..., decoding=...)``); read a
    leaf either way (``cfg.window`` is ``cfg.windows.window``). Saved grouped (config_cli.to_json)."""
    inputs: InputConfig = field(metadata={"title": "inputs", "help": "what to caption, where "
                                          "to write, with which model"})
    windows: WindowConfig = field(default_factory=WindowConfig, metadata={
        "title": "windows", "help": "how each source is cut into windows"})
    decoding: DecodingConfig = field(default_factory=DecodingConfig, metadata={
        "title": "decoding (CLAP + decoder models)",
        "help": "how the text-only decoder turns a window's audio embedding into a caption"})
    scoring: ScoringConfig = field(default_factory=ScoringConfig, metadata={
        "title": "guidance (CLAP + decoder models)",
        "help": "audibility-guided decoding and caption scores (clap_similarity, audibility)"})
    dali: DaliConfig = field(default_factory=DaliConfig, metadata={
        "title": "DALI models", "help": "options of DALI (CLAP audio tokens -> LLaVA) models"})
    resources: ResourceConfig = field(default_factory=ResourceConfig, metadata={
        "title": "resources", "help": "actors, CPUs/GPUs, batches and the Ray cluster"})
    run: RunConfig = field(default_factory=RunConfig, metadata={
        "title": "output and run", "help": "what is written and shown"})

    def __init__(self, *args, **kw):
        init_grouped(self, args, kw)

    def __getattr__(self, name: str):
        return flat_get(self, name)

    def validate(self) -> None:
        """Cross-group rules (config_cli.check runs the per-field and per-group ones first)."""
        if not self.input or not self.output:
            raise OptionError("INPUT and OUTPUT must not be empty")


# Options that mean nothing to the other kind of model, besides its whole group. A DALI model
# embeds and captions in one actor (no --encoder-batch/--encoder-actors/--no-fuse-models) and
# names its own CLAP (no --clap/--decoder override).
_NOT_FOR_DALI = ("clap", "decoder", "fuse_models", "encoder_actors", "encoder_batch",
                 "decode_in_actors")


def refuse_for_model(cfg: CaptionConfig, dali: str) -> None:
    """Raise OptionError (one line) when the user set options that the chosen model would
    ignore: decoding/guidance options and CLAP+decoder resources with a DALI model (``dali``:
    its checkpoint), DALI options with a CLAP + decoder model."""
    set_ = changed(cfg)
    if dali:
        bad = [n for n in set_ if n in _NOT_FOR_DALI
               or n in changed(cfg.decoding) or n in changed(cfg.scoring)]
        if bad:
            raise OptionError(f"{_flags(bad)} {'does' if len(bad) == 1 else 'do'} not apply to "
                              f"the DALI model at {dali} (it captions with --mode, "
                              "--sample-temperature, --max-new-tokens)")
        return
    bad = changed(cfg.dali)
    if bad:
        raise OptionError(f"{_flags(bad)} {'needs' if len(bad) == 1 else 'need'} a DALI model "
                          f"(dali/config.json); {cfg.model} is a CLAP + text-only decoder model "
                          "(audio only)")


__all__ = ["CaptionConfig", "DaliConfig", "DecodingConfig", "InputConfig", "ResourceConfig",
           "RunConfig", "ScoringConfig", "WindowConfig", "refuse_for_model", "DEFAULT_MODEL",
           "TINY_MODEL", "STRATEGIES"]
