"""The caption job's Ray Data pipeline (``build``): decode stage, model stage(s), part writer.

    sources (Arrow rows, jobs/blocks.py) -> decode_sources_here [CPU tasks, one block each]
      -> DaliCaptioner | ClapCaptioner | ClapEmbedder + Captioner [actor pools, whole blocks]
      -> write_part_here [CPU tasks: one atomic Parquet part per block, one metadata row out]

or, with --decode-in-actors on a cluster without GPUs, one stage:
    sources -> DecodeCaptionWrite [actor pool: decode, models, write; one metadata row out]

Ray only here and in jobs/; the stages themselves are plain functions and classes in actors/.
``jobs.caption`` runs it (listing, lease, commits, manifest) and re-exports ``build``.
"""

from __future__ import annotations

import dataclasses
import os

import pyarrow as pa

from jobs.blocks import decode_blocks, sources_table
from jobs.caption_config import CaptionConfig
from jobs.pools import Placement, placement, ray_init


def effective_windows(cfg: CaptionConfig) -> CaptionConfig:
    """--whole-clip S is --window S --hop S: a source up to S s gives one window whose valid
    length is the source's (decode_windows: a clip shorter than the window is one window), and
    the CLAP actor averages that window's model-length chunks (overheard.media.model_input),
    so a 25-s Clotho clip is embedded as the normalised mean of its 0-10, 10-20, 20-25 s chunks."""
    if cfg.whole_clip > 0:
        return dataclasses.replace(cfg, window=cfg.whole_clip, hop=cfg.whole_clip)
    return cfg


# CPUs per part-writer task: Parquet encoding (zstd) and one PUT per file, mostly I/O
WRITER_CPUS = 0.25


def build(cfg: CaptionConfig, sources, clap: str, decoder: str, dali: str = "",
          frame_size: int = 0, attempt: str = "00000000"):
    """The streaming Ray Data pipeline over ``sources`` (Arrow rows as ``sources_table`` makes,
    or a list of (uri, version[, size[, locator]])); returns the Dataset (lazy) whose rows are
    the written parts' metadata (actors/part_writer.py), one per decode block. ``attempt`` (8 hex
    digits) names this run attempt's parts. With ``dali`` (a DALI checkpoint) one DaliCaptioner
    pool replaces the CLAP + decoder pools."""
    place = placement(cfg, ray_init(cfg), dali)
    cfg = effective_windows(cfg)
    if decodes_in_actors(cfg, place, dali):
        return _decode_caption_write_stage(cfg, sources, clap, decoder, attempt, place)
    ds = _decode_stage(cfg, sources, frame_size, attempt)
    if dali:
        ds = _dali_stage(cfg, ds, dali, place)
    else:
        ds = _model_stages(cfg, ds, clap, decoder, place)
    if not cfg.embeddings:
        ds = ds.drop_columns(["audio_embedding"])
    return _writer(cfg, ds, attempt)


def decodes_in_actors(cfg: CaptionConfig, place: Placement, dali: str) -> bool:
    """Whether each model actor decodes its own blocks and writes their parts
    (``actors.decode_caption_write``): --decode-in-actors on a cluster without GPUs, with the
    fused CLAP + decoder actor. With GPUs decoding stays a CPU stage of its own."""
    return cfg.decode_in_actors and cfg.fuse_models and not dali and place.device == "cpu"


def _blocks(cfg: CaptionConfig, sources):
    """The Dataset of decode blocks (jobs/blocks.py), one input block each."""
    import ray.data

    if isinstance(sources, list) and (not sources or isinstance(sources[0], tuple)):
        sources = sources_table(sources)
    return ray.data.from_arrow(decode_blocks(sources, cfg.pack_sources, cfg.unknown_size_sources))


def _decode_kwargs(cfg: CaptionConfig, frame_size: int) -> dict:
    """``actors.windows.decode_sources``' keyword arguments for this job."""
    return dict(window_s=cfg.window, hop_s=cfg.hop or None, min_window_s=cfg.min_window,
                pad_mode=cfg.pad_mode, max_duration_s=cfg.max_duration or None,
                timeout_s=cfg.decode_timeout or None,
                frame_size=frame_size if cfg.mode == "audio+image" else 0)


# CPUs per DecodeCaptionWrite actor: it decodes, runs the models and writes, one block at a
# time on one core (torch_threads 1), so one actor per CPU keeps every core busy.
DECODING_ACTOR_CPUS = 1.0


def _decode_caption_write_stage(cfg: CaptionConfig, sources, clap: str, decoder: str,
                                attempt: str, place: Placement):
    """The whole job in one actor pool (no GPUs): decode blocks in, one metadata row per part
    out, as ``_writer``'s. Measured on the 130-min archive (README "Framework CPU per window")."""
    from actors.decode_caption_write import DecodeCaptionWrite

    clap_kwargs, captioner_kwargs = model_kwargs(cfg, clap, decoder, place.device)
    return _blocks(cfg, sources).map_batches(
        DecodeCaptionWrite, batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=dict(
            decode=_decode_kwargs(cfg, 0), part=_part_kwargs(cfg, attempt),
            clap_kwargs=clap_kwargs, captioner_kwargs=captioner_kwargs,
            encoder_batch=cfg.encoder_batch, captioner_batch=cfg.captioner_batch,
            embeddings=cfg.embeddings, node=_node),
        compute=place.pool(cfg.captioner_actors, 0.0, cpus_each=DECODING_ACTOR_CPUS),
        num_cpus=DECODING_ACTOR_CPUS, **_fault_env())


def _part_kwargs(cfg: CaptionConfig, attempt: str) -> dict:
    return dict(output=cfg.output, run_id=cfg.run_id, attempt=attempt)


def _decode_stage(cfg: CaptionConfig, sources, frame_size: int, attempt: str):
    """The first stage: decode blocks in, each block's windows out as one block (CPU tasks)."""
    return _blocks(cfg, sources).map_batches(
        decode_sources_here, batch_size=None, batch_format="pyarrow",
        fn_kwargs=dict(part=_part_kwargs(cfg, attempt), **_decode_kwargs(cfg, frame_size)),
        # fractional CPUs: on a 2-core node whole-CPU actors would leave no CPU for the
        # reader and Ray Data waits forever (see README, "Resources")
        num_cpus=cfg.decode_cpus,
        # memory=0 reserves nothing (as unset) but makes the remote args differ from the model
        # actors', which keeps Ray Data from fusing decoding into them when both ask for the same
        # CPUs: fused, all decoding would run serially inside the model actors instead of
        # scaling apart. (max_retries=-1 did this before; it is Ray Data's default for tasks and
        # passing it is deprecated in Ray 2.60.) Decode tasks whose worker died are retried.
        memory=0,
    )


def _dali_stage(cfg: CaptionConfig, ds, dali: str, place: Placement):
    """A DALI model: one DaliCaptioner pool (audio, and frames in audio+image mode)."""
    from actors.dali_captioner import DaliCaptioner
    from actors.part_writer import in_blocks

    return _gpus(ds.map_batches(
        in_blocks(DaliCaptioner, cfg.captioner_batch), batch_size=None,
        batch_format="pyarrow",
        fn_constructor_kwargs=dict(model_path=dali, dali=cfg.dali, window_s=cfg.window,
                                   device=place.device, resources=cfg.resources),
        compute=place.pool(cfg.captioner_actors, place.gpus),
        num_cpus=cfg.actor_cpus,
    ), place.gpus)


def model_kwargs(cfg: CaptionConfig, clap: str, decoder: str, device: str) -> tuple[dict, dict]:
    """The ClapEmbedder's and the Captioner's constructor arguments (a ClapCaptioner takes both).
    Each actor takes the option groups it reads (jobs/caption_config.py): a new option is one
    field there and the line in the actor that reads it, nothing here."""
    clap_kwargs = dict(clap_path=clap, window_s=cfg.window, device=device,
                       resources=cfg.resources)
    captioner_kwargs = dict(decoder_path=decoder, decoding=cfg.decoding, scoring=cfg.scoring,
                            clap_path=clap, device=device, resources=cfg.resources)
    return clap_kwargs, captioner_kwargs


def _model_stages(cfg: CaptionConfig, ds, clap: str, decoder: str, place: Placement):
    """CLAP + decoder: one fused ClapCaptioner pool, or (--no-fuse-models) a ClapEmbedder pool
    then a Captioner pool."""
    from actors.part_writer import in_blocks

    clap_kwargs, captioner_kwargs = model_kwargs(cfg, clap, decoder, place.device)
    if cfg.fuse_models:
        from actors.clap_captioner import ClapCaptioner
        return _gpus(ds.map_batches(
            in_blocks(ClapCaptioner, cfg.captioner_batch), batch_size=None,
            batch_format="pyarrow",
            fn_constructor_kwargs=dict(clap_kwargs=clap_kwargs, captioner_kwargs=captioner_kwargs,
                                       encoder_batch=cfg.encoder_batch),
            compute=place.pool(cfg.captioner_actors, place.gpus_fused),
            num_cpus=cfg.actor_cpus,
        ), place.gpus_fused)
    from actors.captioner import Captioner
    from actors.clap_embedder import ClapEmbedder
    ds = _gpus(ds.map_batches(
        in_blocks(ClapEmbedder, cfg.encoder_batch), batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=clap_kwargs,
        compute=place.pool(cfg.encoder_actors, place.gpus),
        num_cpus=cfg.actor_cpus,
    ), place.gpus)
    return _gpus(ds.map_batches(
        in_blocks(Captioner, cfg.captioner_batch), batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=captioner_kwargs,
        compute=place.pool(cfg.captioner_actors, place.gpus),
        num_cpus=cfg.actor_cpus,
    ), place.gpus)


def _gpus(ds, gpus: float):
    """Ask for ``gpus`` per actor of the stage just added. Set on the operator after
    ``map_batches``, which refuses ``num_gpus`` with ``batch_size=None`` (Ray 2.60: "You must
    provide batch_size ... when requesting GPUs"); whole blocks are the point here (the actor
    batches inside, ``in_blocks``), and an integer batch size lets Ray Data slice a block across
    two actor calls (its bundler cuts bundles to the batch size), splitting sources."""
    if gpus > 0:
        ds._logical_plan.dag.ray_remote_args["num_gpus"] = gpus
    return ds


def _writer(cfg: CaptionConfig, ds, attempt: str):
    """The last stage: each block written as one part by a worker, one metadata row out."""
    return ds.map_batches(write_part_here, batch_size=None, batch_format="pyarrow",
                          fn_kwargs=_part_kwargs(cfg, attempt), num_cpus=WRITER_CPUS,
                          **_fault_env())


def _fault_env() -> dict:
    """Fault injection (tests/test_faults.py): the writer-exit hook reaches the workers."""
    from actors.part_writer import EXIT_HOOK

    if os.environ.get(EXIT_HOOK):
        return {"runtime_env": {"env_vars": {EXIT_HOOK: os.environ[EXIT_HOOK]}}}
    return {}


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def write_part_here(batch: pa.Table, **kwargs) -> pa.Table:
    """``actors.part_writer.write_part``, recording the Ray node that wrote the part: the proof
    that output is written where the work is."""
    from actors.part_writer import write_part

    return write_part(batch, node=_node(), **kwargs)


def decode_sources_here(batch: pa.Table, *, part: dict, **kwargs):
    """``actors.part_writer.decode_sources_in_blocks``, recording the node (a failure-only block
    is written by its decode task)."""
    from actors.part_writer import decode_sources_in_blocks

    yield from decode_sources_in_blocks(batch, part=dict(part, node=_node()), **kwargs)
