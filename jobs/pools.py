"""Where the caption job's model stages run: Ray started for the job (``ray_init``, with its
progress bars and dashboard per ``--ray-progress``), and each model pool's GPUs per actor and
size, from what the cluster has or its autoscaler may launch (``placement``, ``pool_size``).
"""

from __future__ import annotations

import dataclasses
import os

from jobs.caption_config import CaptionConfig
from jobs.config_cli import init_ray


def ray_ui(cfg: CaptionConfig) -> bool:
    """Whether Ray's own progress bars / dashboard are on: ``--ray-progress``, where auto means
    "on a cluster" (an address given, or set by ``ray job submit``)."""
    if cfg.ray_progress not in ("auto", "on", "off"):
        raise ValueError(f"--ray-progress must be auto, on or off, got {cfg.ray_progress!r}")
    if cfg.ray_progress == "auto":
        return bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    return cfg.ray_progress == "on"


def ray_init(cfg: CaptionConfig):
    """Ray for the caption job (the cluster at --ray-address, else a local one); returns ``ray``."""
    import logging

    # quiet: the token set-up and "Started a local Ray instance" notices (jobs/quiet.py)
    return init_ray(cfg.ray_address, include_dashboard=ray_ui(cfg), log_to_driver=True,
                    logging_level=logging.INFO if cfg.verbose else logging.ERROR)


# CPU-only clusters: one model actor per this many CPUs. Measured on 2 cores (README
# "Performance"): per 10-s window the models cost 0.014 CPU-s against 0.031-0.057 for decoding,
# so the models are ~20-30% of the work: one single-threaded actor per 4 CPUs keeps both busy.
CPUS_PER_CPU_ACTOR = 4


def cluster_gpus(ray) -> float:
    """GPUs the cluster can offer: those present now, or what its autoscaler may launch
    (cluster.yaml's GPU workers start at 0 nodes; asking for GPU actors is what launches them)."""
    now = float(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state
        most = (state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
    except Exception:  # no autoscaler config (a local or hand-started cluster)
        most = 0
    return max(now, float(most or 0))


def pool_size(requested: int, minimum: int, gpus_total: float, gpus_per_actor: float,
              cpus_total: float, cpus_each: float = CPUS_PER_CPU_ACTOR) -> tuple[int, int]:
    """(min, max) actors of a model pool: ``requested`` > 0 caps it; 0 = one actor per GPU share
    the cluster can offer, or one per ``cpus_each`` CPUs without GPUs."""
    if requested > 0:
        most = requested
    elif gpus_per_actor > 0:
        most = int(gpus_total // gpus_per_actor)
    else:
        most = int(cpus_total // cpus_each)
    most = max(1, most)
    return max(1, min(minimum, most)), most


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the model stages run: GPUs per actor of the two small pools (or the DALI pool) and
    of a fused pool, the device, and the cluster totals the pools are sized from."""
    gpus: float
    gpus_fused: float
    device: str
    gpus_total: float
    cpus_total: float
    min_actors: int

    def pool(self, requested: int, gpus_each: float, cpus_each: float = CPUS_PER_CPU_ACTOR):
        from ray.data import ActorPoolStrategy

        lo, hi = pool_size(requested, self.min_actors, self.gpus_total, gpus_each, self.cpus_total,
                           cpus_each)
        # starts at its maximum: an archive job has work for every actor, and asking for them
        # all at once is what makes an autoscaling cluster launch its GPU workers now rather than
        # one ramp-up step at a time; Ray Data shrinks an idle pool down to --min-actors
        return ActorPoolStrategy(min_size=lo, max_size=hi, initial_size=hi)


def placement(cfg: CaptionConfig, ray, dali: str) -> Placement:
    """Ray Data's context for this job, and the GPUs each model actor asks for."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # the driver prints its own files/windows progress; Ray Data's bars are for cluster runs
    ctx.enable_progress_bars = ray_ui(cfg)
    # No block shaping: a map task's output is ONE block per input block, never merged with
    # another or sliced (128 MiB default: a 1-h source's 690 MB of windows would be cut in 4),
    # so a decode block reaches its part writer whole.
    ctx.target_max_block_size = None
    gpus = gpus_fused = cfg.gpus_per_actor
    gpus_total = cluster_gpus(ray)
    if gpus < 0:
        # two small pools share a card; a DALI or fused CLAP+decoder actor takes a whole one
        # (LLaVA-7B: 14 GB bf16)
        has_gpu = gpus_total > 0
        gpus = (1.0 if dali else 0.5) if has_gpu else 0.0
        gpus_fused = 1.0 if has_gpu else 0.0
    return Placement(gpus=gpus, gpus_fused=gpus_fused, device="cuda" if gpus > 0 else "cpu",
                     gpus_total=gpus_total,
                     cpus_total=float(ray.cluster_resources().get("CPU", 0)),
                     min_actors=cfg.min_actors)
