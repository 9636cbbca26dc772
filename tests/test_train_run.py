"""Every trainer shares one Ray Train run config (``training.common.TrainRun``: schedule, workers,
GPUs, storage, run name, failures, Ray address), so every trainer can be pointed at a cluster
with ``--ray-address`` (issue 14 item 3).

The first two tests are pure argparse (no Ray). The last runs a real trainer in a second Python
process that joins this session's Ray cluster by its address, as a driver on a cluster would.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jobs.config_cli import parser_for
from training.common import TrainRun

ROOT = pathlib.Path(__file__).resolve().parent.parent
# every Ray Train script: module -> its config class
TRAINERS = {"training.decoder": "TrainDecoderConfig", "training.audibility": "Config",
            "training.clap_contrastive": "Config", "training.dali_align": "DaliAlignConfig",
            "training.dali_prefix": "DaliPrefixConfig", "training.dali_distill": "DaliDistillConfig",
            "jobs.build_model": "BuildModelConfig"}


def test_every_trainer_is_listed():
    # a new Ray Train script (one that calls fit() or hands a run to one) must join TRAINERS
    # (build-model is a job: it trains, then runs the caption job and scores it)
    calls_fit = {f"{p.parent.name}.{p.stem}" for d in ("training", "jobs") for p in (ROOT / d).glob("*.py")
                 if p.stem != "common" and ("= fit(train_loop" in p.read_text()
                                            or "run_fields(cfg)" in p.read_text())}
    assert calls_fit == set(TRAINERS)


@pytest.mark.parametrize("module", sorted(TRAINERS))
def test_trainer_config_is_a_train_run_with_flat_flags(module):
    cls = getattr(importlib.import_module(module), TRAINERS[module])
    assert issubclass(cls, TrainRun)
    parser = parser_for(cls, module, "")
    shared = {f.name: f for f in dataclasses.fields(TrainRun)}
    actions = {a.dest: a for a in parser._actions}
    for name, f in shared.items():
        a = actions[name]
        assert "--" + name.replace("_", "-") in a.option_strings
        assert a.help == f.metadata["help"]  # one help text for every trainer
    positionals = [a.dest for a in parser._actions if not a.option_strings]
    args = parser.parse_args(["OUT"] * len(positionals) + [
        "--ray-address", "10.0.0.1:6379", "--num-workers", "3", "--use-gpu", "--gpus-per-worker",
        "0.5", "--storage-path", "s3://b/runs", "--run-name", "r1", "--max-failures", "-1"])
    cfg = cls(**vars(args))
    assert (cfg.ray_address, cfg.num_workers, cfg.use_gpu, cfg.gpus_per_worker, cfg.storage_path,
            cfg.run_name, cfg.max_failures) == ("10.0.0.1:6379", 3, True, 0.5, "s3://b/runs", "r1", -1)
    # the config travels to the workers as a dict (train_loop rebuilds it): nothing is lost
    assert cls(**dataclasses.asdict(cfg)) == cfg


def test_trainer_joins_the_cluster_at_ray_address(ray_local, tmp_path):
    """train-audibility in another process, given this session's cluster address: its driver
    joins that cluster (the GCS address it reports after training is ours) and trains there."""
    address = ray_local.get_runtime_context().gcs_address
    code = ("import json, sys, ray\n"
            "from training.audibility import main\n"
            "rc = main(sys.argv[1:])\n"
            "print('JOINED ' + json.dumps([rc, ray.get_runtime_context().gcs_address]))\n")
    argv = ["--ray-address", address, "--out-dir", str(tmp_path / "clf"), "--epochs", "1",
            "--max-steps", "2", "--num-workers", "1", "--cpus-per-worker", "0.5"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    joined = [line for line in r.stdout.splitlines() if line.startswith("JOINED ")]
    assert r.returncode == 0 and joined, (r.stdout[-2000:], r.stderr[-3000:])
    assert json.loads(joined[0][len("JOINED "):]) == [0, address]
    m = json.loads((tmp_path / "clf" / "audibility_metrics.json").read_text())
    assert [h["steps"] for h in m["history"]] == [2]
    assert m["config"]["ray_address"] == address
