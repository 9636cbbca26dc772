"""A real S3-compatible server for tests: moto's HTTP server behind a pausable proxy.

Kept out of conftest.py so that tests can import it without re-running conftest's
module-level environment set-up (a second import would pick a new port and repoint
S3_ENDPOINT_URL for every later test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
