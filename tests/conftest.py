"""Shared fixtures: a real local Ray cluster, a real S3-compatible server (moto's HTTP server)
on 127.0.0.1, and tiny random-weight models saved in their real formats.

Environment is fixed at import time, before Ray starts, so every Ray worker inherits it:
offline Hugging Face, and S3 credentials/endpoint pointing only at the loopback server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class S3Server:
    """moto's standalone S3 HTTP server as a subprocess: real sockets, real signed requests.

    Clients reach it through a pausable TCP proxy on ``port`` (``outage()``/``restore()``), so
    outage tests see a server that stops answering and comes back with its objects intact.
    ``env`` adds server settings, e.g. INITIAL_NO_AUTH_ACTION_COUNT to enforce credentials.
    """

    def __init__(self, port: int, env: dict | None = None):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.backend_port = _free_port()
        self.env = env or {}
        self.proc = None
        self.proxy = None

    def start(self):
        from tests.netfault import TcpProxy

        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.backend_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, **self.env))
        self.proxy = TcpProxy(self.port, self.backend_port).start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                return self
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("S3 test server did not start")

    def outage(self):
        self.proxy.pause()

    def restore(self):
        self.proxy.resume()

    def stop(self):
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def fs(self, **kw):
        import s3fs
        return s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True, **kw)


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
    from overheard.decoder import build_tiny_decoder
    from overheard.tiny import build_tiny_clap

    d = tmp_path_factory.mktemp("tiny-model")
    build_tiny_clap(str(d / "clap"), seed=0)
    from overheard.clap import ClapEncoder
    dim = ClapEncoder(str(d / "clap")).embedding_dim
    build_tiny_decoder(str(d / "decoder"), embedding_dim=dim, seed=0)
    return str(d)
