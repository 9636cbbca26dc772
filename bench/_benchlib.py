"""Shared helpers for bench/throughput.py, bench/memory_flat.py, bench/soak.py.

* generated media (ffmpeg / numpy), cached under a directory outside the repository;
* a /proc sampler over this process and all its descendants (the local Ray head's GCS, raylet and
  workers are started by ``ray.init`` as descendants of the driver): CPU time, RSS, RssAnon and the
  kernel's per-process high-water mark VmHWM, grouped by role (process title set by Ray, e.g.
  ``ray::MapWorker(MapBatches(ClapEmbedder))``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
CACHE = Path(os.environ.get("OVERHEARD_BENCH_MEDIA", "/tmp/overheard-bench-media"))
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------ media

def _stereo_source(path: Path, seconds: float, seed: int, codec: list[str]) -> Path:
    """44.1 kHz stereo, left pink noise (seeded), right 440 Hz + 3 kHz, encoded with ``codec``."""
    if path.exists() and path.stat().st_size > 0:
        return path
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    cmd = FFMPEG + [
        "-f", "lavfi", "-i", f"anoisesrc=color=pink:sample_rate=44100:amplitude=0.2:seed={seed}:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency={220 + 10 * (seed % 50)}:sample_rate=44100:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=3000:sample_rate=44100:duration={seconds}",
        "-filter_complex", "[1:a][2:a]amix=inputs=2,aformat=sample_fmts=fltp[r];[0:a]aformat=sample_fmts=fltp[l];"
                           "[l][r]join=inputs=2:channel_layout=stereo[out]",
        "-map", "[out]", *codec, "-ar", "44100", "-fflags", "+bitexact", str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.rename(path)
    return path


def realistic_media(n_clips: int = 60, n_long: int = 2, long_s: float = 600.0) -> list[Path]:
    """``n_clips`` 10-s AAC-in-mp4 clips + ``n_long`` flac files of ``long_s`` (44.1 kHz stereo)."""
    d = CACHE / "realistic"
    d.mkdir(parents=True, exist_ok=True)
    jobs = [(d / f"clip{i:03d}.mp4", 10.0, i, ["-c:a", "aac", "-b:a", "128k"]) for i in range(n_clips)]
    jobs += [(d / f"long{i}_{int(long_s)}s.flac", long_s, 1000 + i, ["-c:a", "flac"]) for i in range(n_long)]
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda a: _stereo_source(*a), jobs))


def small_wavs(n: int, subdir: str, seed: int = 0) -> list[Path]:
    """``n`` 1-2 s 48 kHz 16-bit mono wav files (tone + noise), written with numpy (fast)."""
    d = CACHE / subdir
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = d / f"s{i:05d}.wav"
        dur = 1.0 + (i % 11) / 10.0
        if not p.exists():
            t = np.arange(int(dur * 48000)) / 48000
            x = 0.2 * np.sin(2 * np.pi * (200 + 7 * (i % 300)) * t) + 0.05 * rng.standard_normal(t.size)
            with wave.open(str(p), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(48000)
                w.writeframes((x * 32767).astype("<i2").tobytes())
        out.append(p)
    return out


def duration_s(path: Path) -> float:
    import av
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        if s.duration is not None and s.time_base is not None:
            return float(s.duration * s.time_base)
        return float(c.duration) / av.time_base


# --------------------------------------------------------------------------------------- sampling

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                st = f.read()
            ppid = int(st[st.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root: int) -> list[int]:
    kids = _children_map()
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(kids.get(p, []))
    return out


def role_of(title: str, pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    if "bench/" in title:  # forked multiprocessing children of the benchmark itself
        return "pool process"
    for key, role in (("ClapCaptioner", "ClapCaptioner actor"),
                      ("DecodeCaptionWrite", "DecodeCaptionWrite actor"),
                      ("ClapEmbedder", "ClapEmbedder actor"), ("Captioner", "Captioner actor"),
                      ("decode_sources", "decode task worker"),
                      ("write_part", "part writer task worker"),
                      ("ReadFromArrow", "decode task worker"),
                      ("FromArrow", "decode task worker"), ("ray::", "other ray worker"),
                      ("raylet", "ray system"), ("gcs_server", "ray system"), ("python", "ray system")):
        if key in title:
            return role
    return "other"


def proc_info(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICK
        status = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon"):
                    status[k] = int(v.split()[0]) * 1024
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, ValueError, IndexError):
        return None
    return dict(cpu=cpu, rss=status.get("VmRSS", 0), hwm=status.get("VmHWM", 0),
                anon=status.get("RssAnon", 0), title=title[:200])


class ProcSampler:
    """Sample this process tree every ``interval`` s in a thread.

    Keeps, per pid: last CPU seconds (utime+stime+cutime+cstime), max RSS / RssAnon seen, VmHWM,
    every role it had (a Ray worker process can run a decode task, then idle, then another), and a
    time series of (t, total RSS, RSS by role, cumulative CPU of the tree)."""

    def __init__(self, interval: float = 0.5, root: int | None = None):
        self.interval = interval
        self.root = root or os.getpid()
        self.procs: dict[int, dict] = {}
        self.series: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.t0 = None

    def start(self):
        self.t0 = time.time()
        self.cpu0 = self._cpu_now()
        self._thread.start()
        return self

    def _cpu_now(self) -> float:
        return sum((proc_info(p) or {"cpu": 0})["cpu"] for p in descendants(self.root))

    def sample(self) -> dict:
        by_role: dict[str, int] = {}
        anon_by_role: dict[str, int] = {}
        total = 0
        for pid in descendants(self.root):
            info = proc_info(pid)
            if info is None:
                continue
            rec = self.procs.setdefault(pid, dict(cpu=0.0, rss=0, anon=0, hwm=0, roles=set(),
                                                  hwm_by_role={}, title=""))
            role = role_of(info["title"], pid, self.root)
            rec["cpu"] = max(rec["cpu"], info["cpu"])
            rec["rss"] = max(rec["rss"], info["rss"])
            rec["anon"] = max(rec["anon"], info["anon"])
            rec["hwm"] = max(rec["hwm"], info["hwm"])
            rec["roles"].add(role)
            rec["title"] = info["title"]
            # RSS while holding this role (a reused worker's VmHWM mixes roles)
            rec["hwm_by_role"][role] = max(rec["hwm_by_role"].get(role, 0), info["rss"])
            rec.setdefault("anon_by_role", {})
            rec["anon_by_role"][role] = max(rec["anon_by_role"].get(role, 0), info["anon"])
            by_role[role] = by_role.get(role, 0) + info["rss"]
            anon_by_role[role] = anon_by_role.get(role, 0) + info["anon"]
            total += info["rss"]
        s = dict(t=time.time() - self.t0, rss=total, by_role=by_role, anon_by_role=anon_by_role,
                 cpu=sum(r["cpu"] for r in self.procs.values()))
        self.series.append(s)
        return s

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()
        return self

    # summaries
    def cpu_s(self) -> float:
        """CPU seconds of the tree during sampling (processes that exit between samples lose at most
        their last ``interval``; exited children waited for by a sampled parent are in its cutime)."""
        return sum(r["cpu"] for r in self.procs.values()) - self.cpu0

    def peak_total_rss(self) -> int:
        return max((s["rss"] for s in self.series), default=0)

    def peak_by_role(self, key: str = "hwm_by_role") -> dict[str, int]:
        """Per role: the largest RSS (``key="anon_by_role"``: RssAnon, private memory without the
        object-store pages a process has mapped) any single process had while holding that role."""
        out: dict[str, int] = {}
        for r in self.procs.values():
            for role, v in r.get(key, {}).items():
                out[role] = max(out.get(role, 0), v)
        return out


def mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def machine_line() -> str:
    import platform
    la = os.getloadavg()
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"{os.sysconf('SC_PHYS_PAGES') * PAGE / 2**30:.0f} GiB RAM, no GPU; "
            f"load average at start {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} (1/5/15 min; 2.0 = both cores busy)")


def load_now() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------ job runner

def run_job_sampled(input_dir: Path, interval: float = 0.5, cores: int = 2, **overrides) -> dict:
    """ray.init(num_cpus=cores) in this process, jobs.caption.run over ``input_dir`` with the default
    cheap model while a ProcSampler watches the whole tree; ray.shutdown() after."""
    import dataclasses
    import shutil
    import tempfile

    import ray

    from jobs.caption import CaptionConfig, run

    s = ProcSampler(interval).start()
    ray_init(cores)
    out = Path(tempfile.mkdtemp(prefix="ovh-bench-out-"))
    try:
        cfg = dataclasses.replace(CaptionConfig(input=str(input_dir), output=str(out), progress=False,
                                                show=0), **overrides)
        t_run = time.time() - s.t0
        t = time.perf_counter()
        m = run(cfg)
        wall = time.perf_counter() - t
        import pyarrow.parquet as pq
        rows = pq.read_table(str(out / "captions"), columns=["source_uri", "window_index"])
        keys = set(zip(rows.column("source_uri").to_pylist(), rows.column("window_index").to_pylist()))
        s.stop()
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    return dict(manifest=m, wall=wall, sampler=s, t_run=t_run, rows=rows.num_rows, unique=len(keys))


def ray_init(cores: int, attempts: int = 3) -> None:
    """ray.init(num_cpus=cores); retried because Ray gives a raylet a fixed 30 s to register with
    the GCS, which a heavily loaded 2-core machine can exceed."""
    import ray
    for i in range(attempts):
        try:
            ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
            return
        except Exception:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
            if i == attempts - 1:
                raise


def link_subset(files: list[Path], name: str) -> Path:
    d = CACHE / name
    d.mkdir(parents=True, exist_ok=True)
    for p in files:
        if not (d / p.name).exists():
            os.link(p, d / p.name)
    return d


def window_batch(n: int, *, samples: int = 480000, frame: int = 0, embedding_dim: int = 0,
                 seed: int = 0):
    """A synthetic batch of window rows (overheard.schema's contract) for benches that time one
    actor: ``samples`` > 0 adds 10 s of noise per window (the decode stage's output), ``frame`` an
    S x S RGB frame, ``embedding_dim`` a unit embedding + ``clap_id`` (the embed stage's)."""
    from overheard.schema import add_columns, window_row, window_table

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        x = (rng.standard_normal(samples) * 0.1).astype(np.float32)
        r = window_row(f"bench://{i}", "", 0, 0.0, samples / 48000, x, "repeatpad", n_windows=1)
        if not samples:
            r.pop("samples")
        if frame:
            r["frame"] = rng.integers(0, 256, frame * frame * 3, dtype=np.uint8).tobytes()
        rows.append(r)
    t = window_table(rows)
    if embedding_dim:
        e = rng.standard_normal((n, embedding_dim)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        t = add_columns(t, audio_embedding=e, clap_id=["bench"] * n)
    return t
