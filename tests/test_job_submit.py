"""The README's cluster path, as written: `ray start --head` + a worker node, then
`ray job submit --working-dir . -- python -m jobs.caption IN OUT` with Ray 2.60's token auth.

Everything runs in subprocesses with their own HOME (the token lives in ~/.ray/auth_token) and
their own short temp dirs (Ray's AF_UNIX socket paths must stay under 108 bytes), so the suite's
session Ray never sees this cluster and nothing touches the real home directory. EVERY port either
node opens is given explicitly and was free a moment before: an earlier version of this test left
the agent ports at their defaults and, inside the full suite (beside the session's Ray), the job
agent never came up ("No available agent"). Both `ray start --block` processes run in their own
sessions; at the end they and every process whose command line names one of this cluster's temp
dirs are killed by pid (never `ray stop`, which would stop every Ray on the machine). The head has
0 CPUs, so decode tasks, model actors and part writers can only run on the worker node. Checks: a
client without the token is refused; with it the job succeeds, the output has exactly one row
per window, and every committed part was written on the worker node (its Ray node id, recorded
by the part writer in the run manifest).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import wave

import json
import socket

import numpy as np
import pytest

from tests.s3server import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _wav(path: str, seconds: float, freq: float) -> None:
    t = np.arange(int(seconds * 16000)) / 16000
    x = (0.2 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(x.tobytes())


def _port_range(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now (for the worker port range)."""
    rng = np.random.default_rng()
    for _ in range(200):
        lo = int(rng.integers(20000, 29000))
        socks = []
        try:
            for p in range(lo, lo + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return lo
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _node_ports(worker_lo: int) -> list[str]:
    """Every port a node opens, explicitly (defaults clash with other Ray instances here)."""
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 39}"]


def _kill_cluster(procs, tmps: list[str]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    # whatever is left of this cluster (its processes name its temp dir on their command line)
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if any(t.encode() in cmd for t in tmps):
            try:
                os.kill(int(d), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.skipif(not os.path.exists(RAY), reason="ray CLI not installed beside this python")
def test_ray_job_submit_with_token_on_two_nodes(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # Ray's session dir holds AF_UNIX sockets (paths <= 107 bytes): pytest's tmp_path is too deep
    rtmp = tempfile.mkdtemp(prefix="ohjs-", dir="/tmp")
    wtmp = tempfile.mkdtemp(prefix="ohjw-", dir="/tmp")
    logs = tmp_path / "logs"
    logs.mkdir()
    media = tmp_path / "media"
    media.mkdir()
    want = {}
    for i, s in enumerate([3.0, 12.0, 25.0]):  # 1, 2, 3 windows of 10 s
        p = str(media / f"clip{i}.wav")
        _wav(p, s, 300 + 100 * i)
        want[p] = {3.0: 1, 12.0: 2, 25.0: 3}[s]
    out = str(tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(HOME=str(home), RAY_TMPDIR=rtmp, RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").exists()
    port, dash = _free_port(), _free_port()
    lo = _port_range(80)
    procs = []
    try:
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
             f"--ray-client-server-port={_free_port()}", *_node_ports(lo),
             "--num-cpus=0", f"--temp-dir={rtmp}", "--block"],
            env=env, cwd=ROOT, stdout=open(logs / "head.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True))
        addr = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 180
        while True:  # the job server answers once the head is up
            r = subprocess.run([RAY, "job", "list", "--address", addr], env=env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            assert time.time() < deadline, (r.stderr[-2000:],
                                            (logs / "head.log").read_text()[-3000:])
            time.sleep(2)
        # The worker node. `ray start` gives up when its raylet has not registered within a
        # fixed 30 s (ray/_private/node.py), which a loaded 2-core machine can exceed: then its
        # leftovers are killed and it is started again. The job is submitted only once both nodes
        # are alive (the head has 0 CPUs: with no worker the job would wait forever).
        nodes = {}
        for attempt in range(3):
            worker = subprocess.Popen(
                [RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                 *_node_ports(lo + 40), "--num-cpus=2", f"--temp-dir={wtmp}", "--block"],
                env=env, cwd=ROOT, stdout=open(logs / f"worker{attempt}.log", "wb"),
                stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(worker)
            deadline = time.time() + 180
            while worker.poll() is None and time.time() < deadline:
                r = subprocess.run([RAY, "list", "nodes", "--address", addr, "--format", "json",
                                    "--filter", "state=ALIVE"],
                                   env=env, capture_output=True, text=True, timeout=120)
                if r.returncode == 0 and "[" in r.stdout:  # JSON after any notice lines
                    nodes = {n["node_id"]: n for n in json.loads(r.stdout[r.stdout.index("["):])}
                    if len(nodes) == 2:
                        break
                time.sleep(2)
            if len(nodes) == 2:
                break
            _kill_cluster([worker], [wtmp])
        assert len(nodes) == 2, [(logs / f).read_text()[-2000:] for f in os.listdir(logs)]

        # a client without the cluster's token is refused
        bare = dict(env, HOME=str(tmp_path))  # no .ray/auth_token there
        r = subprocess.run([RAY, "job", "list", "--address", addr], env=bare,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr

        # exactly the README's command (plus test-sized options). The job server may answer
        # before its job agent is up ("No available agent to submit job, please try again
        # later": nothing was submitted), so that answer alone is retried.
        deadline = time.time() + 180
        while True:
            r = subprocess.run(
                [RAY, "job", "submit", "--address", addr, "--working-dir", ".", "--",
                 "python", "-m", "jobs.caption", str(media), out, "--show", "0"],
                env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
            if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert r.returncode == 0 and "succeeded" in r.stdout.lower(), (r.stdout[-3000:],
                                                                       r.stderr[-3000:])
    finally:
        _kill_cluster(procs, [rtmp, wtmp])
        shutil.rmtree(rtmp, ignore_errors=True)
        shutil.rmtree(wtmp, ignore_errors=True)
    workers = {i for i, n in nodes.items() if not n.get("is_head_node")}
    assert len(nodes) == 2 and len(workers) == 1, nodes
    [mpath] = [os.path.join(out, "runs", d, "manifest.json") for d in os.listdir(
        os.path.join(out, "runs"))]
    with open(mpath) as f:
        m = json.load(f)
    # every committed part was written by a worker of the worker node, none by the driver's node
    assert m["status"] == "completed" and set(m["nodes"]) == workers, (m["nodes"], nodes)
    assert sum(m["nodes"].values()) >= 1 and m["parts"]

    from jobs.sink import read_table_dir
    t = read_table_dir(os.path.join(out, "captions"), ["source_uri", "window_index", "caption"])
    got = list(zip(t.column("source_uri").to_pylist(), t.column("window_index").to_pylist()))
    assert len(got) == len(set(got)) == sum(want.values())
    assert set(got) == {(u, i) for u, n in want.items() for i in range(n)}
    assert all(t.column("caption").to_pylist())
