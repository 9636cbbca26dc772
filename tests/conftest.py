"""Shared fixtures: a real local Ray cluster, a real S3-compatible server (moto's HTTP server)
on 127.0.0.1, and tiny random-weight models saved in their real formats.

Environment is fixed at import time, before Ray starts, so every Ray worker inherits it:
offline Hugging Face, and S3 credentials/endpoint pointing only at the loopback server.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.s3server import S3Server, _free_port  # noqa: E402


S3_PORT = _free_port()
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_ACCESS_KEY_ID": "overheard-test-key",
    "AWS_SECRET_ACCESS_KEY": "overheard-test-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
    "S3_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "OVERHEARD_CACHE": os.path.join("/tmp", f"overheard-test-cache-{os.getpid()}"),
})
# Never let a developer's own AWS profile leak into tests.
for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(k, None)


@pytest.fixture(scope="session")
def s3_server():
    srv = S3Server(S3_PORT).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    fs = s3_server.fs()
    fs.mkdir("overheard-test")
    return "overheard-test"


@pytest.fixture(scope="session")
def ray_local():
    import ray
    # 2 CPUs like the CI machine; the job's fractional actor CPUs must fit in them.
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A model directory in the job's layout: clap/ (HF ClapModel) + decoder/."""
    from overheard.tiny import build_tiny_decoder
    from overheard.tiny import build_tiny_clap

    d = tmp_path_factory.mktemp("tiny-model")
    build_tiny_clap(str(d / "clap"), seed=0)
    from overheard.clap import ClapEncoder
    dim = ClapEncoder(str(d / "clap")).embedding_dim
    build_tiny_decoder(str(d / "decoder"), embedding_dim=dim, seed=0)
    return str(d)


@pytest.fixture(scope="session")
def tiny_dali(tmp_path_factory):
    """A DALI model directory in the caption job's layout: clap/ (tiny random HF ClapModel),
    llava/ (tiny random LLaVA-1.5-format model), dali/ (untrained heads naming ../clap, ../llava)."""
    from overheard.dali.tiny import build_tiny_dali

    d = tmp_path_factory.mktemp("dali-model")
    build_tiny_dali(d, seed=0)
    return d
