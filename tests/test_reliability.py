"""Issue 15, "reliability on real archives": special files, undecodable names, links, option
validation, the output lease, inputs that try to act as instructions, model checks. Real files,
real processes, a real HTTP server on 127.0.0.1 and the suite's S3 server; no mocks."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests import media_factory as mf
from tests.test_caption_job import ROOT, read_dir

WINDOW_KW = dict(window_s=10.0, hop_s=None, min_window_s=0.5, pad_mode="repeatpad",
                 max_duration_s=None, timeout_s=30.0)


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def http_server():
    """A server on 127.0.0.1 that records every request (a playlist must never reach it)."""
    _Recorder.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Recorder.seen
    srv.shutdown()


def _playlists(d, base: str) -> dict[str, str]:
    """An HLS playlist and an ffconcat script (named .mp4) pointing at ``base`` / a sibling."""
    (d / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n"
                                 f"{base}/seg.wav\n#EXT-X-ENDLIST\n")
    (d / "script.mp4").write_text("ffconcat version 1.0\nfile 'clean.wav'\n")
    (d / "remote.mp3").write_text(f"#EXTM3U\n#EXTINF:2.0,\n{base}/other.mp3\n")
    return {"list.m3u8": "unsupported", "script.mp4": "unsupported", "remote.mp3": "unsupported"}


@pytest.fixture(scope="module")
def messy(tmp_path_factory, http_server):
    """A folder holding what broke the job in issue 15, with the error_type each must end as
    (None: captioned)."""
    base, _ = http_server
    d = tmp_path_factory.mktemp("messy")
    mf.make_tone(str(d / "clean.wav"), seconds=3.0, sr=16000, channels=1, freq=500)
    expected: dict[bytes, str | None] = {b"clean.wav": None}
    os.mkfifo(d / "pipe.wav")  # opening it would block until a writer appears
    expected[b"pipe.wav"] = "not_a_file"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock.wav"))  # a socket used to be a read_error retried on every run
    s.close()
    expected[b"sock.wav"] = "not_a_file"
    latin1 = os.fsencode(str(d)) + b"/caf\xe9.wav"  # not UTF-8
    mf.make_tone(os.fsdecode(latin1), seconds=2.0, sr=16000, channels=1, freq=700)
    expected[b"caf\xe9.wav"] = None
    # a link newer than its target (git-annex, DVC): used to be `changed` on every run
    mf.make_tone(str(d / "target.flac"), seconds=2.0, sr=16000, channels=2, freq=900)
    os.utime(d / "target.flac", (1_000_000_000, 1_000_000_000))
    os.symlink("target.flac", d / "link.flac")
    expected[b"link.flac"] = None
    expected[b"target.flac"] = None
    for name, etype in _playlists(d, base).items():
        expected[name.encode()] = etype
    # 128 channels: a layout the downmix does not take, not a damaged file
    subprocess.run(["sox", "-n", "-r", "8000", "-c", "128", "-b", "16", str(d / "c128.wav"),
                    "synth", "0.5", "sine", "300"], check=True)
    expected[b"c128.wav"] = "unsupported"
    return d, expected


def _uri(d, raw: bytes) -> str:
    from overheard.storage import uri_text
    return uri_text(os.fsdecode(os.fsencode(str(d)) + b"/" + raw))


# ------------------------------------------------------------------ decode stage, no Ray

def test_special_files_fail_without_blocking(messy):
    from actors.windows import source_windows
    d, _ = messy
    t = time.monotonic()
    for name in ("pipe.wav", "sock.wav"):
        rows = list(source_windows(str(d / name), "v", **WINDOW_KW))
        assert [r["error_type"] for r in rows] == ["not_a_file"], rows
        assert "not a regular file" in rows[0]["error_message"]
    assert time.monotonic() - t < 5  # measured ~1 ms; a blocking open() never returns


def test_playlists_never_fetch(messy, http_server):
    from actors.windows import source_windows
    d, expected = messy
    base, seen = http_server
    for name in ("list.m3u8", "script.mp4", "remote.mp3"):
        rows = list(source_windows(str(d / name), "v", **WINDOW_KW))
        assert [r["error_type"] for r in rows] == ["unsupported"], (name, rows)
    # URLs of other schemes named by a manifest are never opened either
    rows = list(source_windows(f"{base}/seg.wav", "", **WINDOW_KW))
    assert [r["error_type"] for r in rows] == ["unsupported"]
    assert seen == []


def test_file_urls_resolve_to_the_path(messy, tmp_path, monkeypatch):
    from overheard import storage
    d, _ = messy
    monkeypatch.chdir(tmp_path)  # file:// used to resolve under the working directory
    assert storage.get_fs(f"file://{d}/clean.wav")[1] == str(d / "clean.wav")
    with storage.open_input(f"file://{d}/clean.wav") as f:
        assert f.read(4) == b"RIFF"


def test_latin1_name_round_trips(messy):
    from overheard import storage
    d, _ = messy
    uris = [u for u, _, _ in storage.list_files(str(d), (".wav",))]
    text = _uri(d, b"caf\xe9.wav")
    assert text in uris and text.endswith("caf\\xe9.wav")
    pa.array(uris, pa.string())  # every listed name is a valid Parquet string
    with storage.open_input(text) as f:
        assert f.read(4) == b"RIFF"


# ------------------------------------------------------------------ the job, on Ray

def test_messy_folder_through_the_job_and_rerun(ray_local, tiny_model, messy, http_server):
    """The whole folder with --all-files and OUTPUT inside INPUT; then a rerun redoes nothing
    (a link older than its target and a non-UTF-8 name are done, not `changed`)."""
    from jobs.caption import CaptionConfig, run
    from overheard.schema import ERROR_TYPES
    d, expected = messy
    _, seen = http_server
    out = d / "captions-out"  # inside the input: its own files must never become sources
    cfg = CaptionConfig(input=str(d), output=str(out), model=tiny_model, progress=False,
                        show=0, all_files=True)
    m = run(cfg)
    assert m["status"] == "completed" and m["sources_incomplete"] == 0
    assert m["sources_todo"] == len(expected), m
    caps = read_dir(str(out / "captions"))
    fails = read_dir(str(out / "failures")).to_pylist()
    by_uri = {f["source_uri"]: f for f in fails}
    assert len(by_uri) == len(fails)  # one failure row per failed source
    for raw, etype in expected.items():
        uri = _uri(d, raw)
        n = caps.filter(pc.equal(caps["source_uri"], uri)).num_rows
        if etype is None:
            assert n >= 1 and uri not in by_uri, (raw, by_uri.get(uri))
        else:
            assert n == 0 and by_uri[uri]["error_type"] == etype, (raw, by_uri.get(uri))
    assert all(f["error_type"] in ERROR_TYPES for f in fails)
    keys = list(zip(caps["source_uri"].to_pylist(), caps["window_index"].to_pylist()))
    assert len(keys) == len(set(keys))
    assert seen == []
    assert not (out / "_lease.json").exists()  # released at the end
    m2 = run(cfg)
    assert m2["sources_todo"] == 0 and m2["sources_listed"] == len(expected), m2


def test_manifest_versions_duplicates_and_types(ray_local, tiny_model, tmp_path):
    """A manifest naming one file three times with S3-style VersionIds (not what the listing
    would compute) and sizes as text: one source, captioned once, not `changed`; a rerun skips
    it. A manifest whose uri column is not text is refused before any work."""
    from jobs.caption import CaptionConfig, run
    src = tmp_path / "a.wav"
    mf.make_tone(str(src), seconds=2.0, sr=16000, channels=1, freq=440)
    man = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "uri": [str(src), str(src), str(src)],
        "version": ["3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY", "v2", None],
        "size": ["64078", "x", None]}), man)
    out = tmp_path / "out"
    m = run(CaptionConfig(input=str(man), output=str(out), model=tiny_model, progress=False,
                          show=0))
    assert m["sources_todo"] == 1 and m["sources_captioned"] == 1, m
    assert m["failures_by_type"] == {}
    caps = read_dir(str(out / "captions"))
    assert caps.num_rows == 1
    assert caps["source_version"].to_pylist() == ["3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"]
    m2 = run(CaptionConfig(input=str(man), output=str(out), model=tiny_model, progress=False,
                           show=0))
    assert m2["sources_todo"] == 0
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"uri": [1, 2]}), bad)
    with pytest.raises(ValueError, match="must hold text"):
        run(CaptionConfig(input=str(bad), output=str(tmp_path / "o2"), model=tiny_model,
                          progress=False, show=0))


def test_two_runs_together_then_interrupt_and_rerun(ray_local, tiny_model, tmp_path):
    """Two caption processes on one output, started together: one runs, the other refuses with
    one line (exit 3) before any work. The running one is then interrupted (SIGINT) after its
    first part: its manifest counts every unwritten source as incomplete, including those never
    started (it used to say 0), and it releases the lease. A rerun completes the rest: every
    window is written exactly once."""
    import signal

    from jobs.caption import CaptionConfig, run
    d = tmp_path / "in"
    d.mkdir()
    n = 8
    for i in range(n):
        mf.make_tone(str(d / f"t{i}.wav"), seconds=12.0, sr=16000, channels=1, freq=300 + 60 * i)
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    # batch 1 and a flush after each source: the run is still going when its first part lands
    cmd = [sys.executable, "-m", "jobs.caption", str(d), str(out), "--model", tiny_model,
           "--no-progress", "--show", "0", "--ray-address", address, "--flush-interval", "0",
           "--captioner-batch", "1", "--encoder-batch", "1", "--no-pack-sources"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    deadline = time.time() + 300
    # a committed part (workers write parts; one counts once the driver's commit lists it)
    while time.time() < deadline and not ((out / "_commits").exists()
                                          and os.listdir(out / "_commits")
                                          and any(p.poll() is not None for p in procs)):
        time.sleep(0.1)
    running = [p for p in procs if p.poll() is None]
    assert len(running) == 1, "both runs still running, or none"
    running[0].send_signal(signal.SIGINT)
    res = {p: (p.wait(timeout=300), *p.communicate()) for p in procs}
    winner, loser = res[running[0]], res[next(p for p in procs if p is not running[0])]
    assert loser[0] == 3, loser[2][-2000:]
    # one line from us (transformers may draw its weight-loading bar above it)
    ours = [ln for ln in loser[2].splitlines() if ln.startswith("overheard caption:")]
    assert len(ours) == 1 and "is in use by run" in ours[0], loser[2][-2000:]
    assert loser[2].strip().splitlines()[-1] == ours[0]
    assert winner[0] == 1, winner[2][-2000:]  # interrupted, not completed
    assert len(os.listdir(out / "runs")) == 1  # the loser wrote nothing, not even its config
    m = json.loads(next((out / "runs").glob("*/manifest.json")).read_text())
    # what counts is what is committed: a writer task still running at the interrupt may leave
    # a part no commit lists (never read; the next run deletes it)
    from jobs.sink import read_table_dir
    done = len(set(read_table_dir(str(out / "captions"))["source_uri"].to_pylist()))
    assert m["status"] == "interrupted" and 0 < done < n
    assert m["sources_incomplete"] == m["sources_todo"] - m["sources_captioned"] == n - done
    assert not (out / "_lease.json").exists()  # released on the way out
    m2 = run(CaptionConfig(input=str(d), output=str(out), model=tiny_model, progress=False,
                           show=0))
    assert m2["status"] == "completed" and m2["sources_todo"] == n - done
    caps = read_dir(str(out / "captions"))
    keys = list(zip(caps["source_uri"].to_pylist(), caps["window_index"].to_pylist()))
    assert len(keys) == len(set(keys)) == n * 2  # 12 s at 10-s windows: 2 windows each


def test_lease_on_s3_uses_conditional_writes(s3_server, s3_bucket):
    """On the S3 server (moto honours If-None-Match: *): a held lease refuses a second run, a
    stale one is taken over, release removes it."""
    from jobs.lease import LeaseHeld, OutputLease
    out = f"s3://{s3_bucket}/lease-test"
    a = OutputLease(out, "run-a", stale_s=60).acquire()
    with pytest.raises(LeaseHeld, match="in use by run run-a"):
        OutputLease(out, "run-b", stale_s=60).acquire()
    # run-a stops beating (a killed process on another host): after stale_s it is taken over
    a._stop.set()
    fs = s3_server.fs()
    body = json.loads(fs.cat(f"{s3_bucket}/lease-test/_lease.json"))
    body.update(heartbeat=time.time() - 120, host="elsewhere")
    fs.pipe(f"{s3_bucket}/lease-test/_lease.json", json.dumps(body).encode())
    b = OutputLease(out, "run-b", stale_s=60).acquire()
    assert json.loads(fs.cat(f"{s3_bucket}/lease-test/_lease.json"))["run_id"] == "run-b"
    b.release()
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/lease-test/_lease.json")


def test_lease_of_a_killed_local_run_is_taken_over(tmp_path):
    from jobs.lease import OutputLease
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "_lease.json").write_text(json.dumps(dict(
        run_id="dead", host=socket.gethostname(), pid=p.pid, heartbeat=time.time(),
        stale_s=120)))
    p.kill()
    p.wait()
    lease = OutputLease(str(tmp_path), "next", stale_s=120).acquire()  # no 120-s wait
    assert json.loads((tmp_path / "_lease.json").read_text())["run_id"] == "next"
    lease.release()


# ------------------------------------------------------------------ options, before any work

BAD_OPTIONS = [
    ["--window", "0"], ["--window", "-1"], ["--window", "1e6"], ["--window", "nan"],
    ["--hop", "-1"], ["--hop", "inf"], ["--pad-mode", "bogus"], ["--limit", "-1"],
    ["--min-window", "11"], ["--strategy", "x"], ["--num-beams", "0"],
    ["--guidance-weights", "1,nan,2"], ["--decode-timeout", "-5"], ["--dtype", "fp8"],
    ["--mode", "video"], ["--encoder-batch", "0"], ["--lease-stale", "0"],
]


@pytest.mark.parametrize("opts", BAD_OPTIONS, ids=lambda o: " ".join(o))
def test_bad_options_exit_2_with_one_line(opts, tmp_path, capsys):
    from jobs.caption import main
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), str(tmp_path / "out"), *opts])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and opts[0] in err[0], err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_every_command_refuses_nan(tmp_path, capsys):
    """The check is in config_cli.parse, so every dataclass command gets it."""
    from jobs.config_cli import parse
    from training.embed_captions import EmbedCaptionsConfig
    floats = [f.name for f in __import__("dataclasses").fields(EmbedCaptionsConfig)
              if f.type in (float, "float")]
    req = [f.name for f in __import__("dataclasses").fields(EmbedCaptionsConfig)
           if f.default is __import__("dataclasses").MISSING]
    if not floats:
        pytest.skip("EmbedCaptionsConfig has no float option")
    with pytest.raises(SystemExit) as e:
        parse(EmbedCaptionsConfig, [*(str(tmp_path) for _ in req),
                                    "--" + floats[0].replace("_", "-"), "nan"], "x", "x")
    assert e.value.code == 2


# ------------------------------------------------------------------ models are checked

def _copy_model(src: str, dst) -> str:
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_clap_missing_or_extra_tensor_is_refused(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from overheard.clap import load_clap_model
    d = _copy_model(os.path.join(tiny_model, "clap"), tmp_path / "clap")
    w = os.path.join(d, "model.safetensors")
    sd = load_file(w)
    gone = sorted(k for k in sd if k.startswith("audio_projection"))[0]
    save_file({k: v for k, v in sd.items() if k != gone}, w)
    with pytest.raises(ValueError, match="missing tensor") as e:
        load_clap_model(d)
    assert gone in str(e.value)
    save_file(dict(sd, surprise=sd[gone].clone()), w)
    with pytest.raises(ValueError, match="unexpected tensor.*surprise"):
        load_clap_model(d)


def test_absurd_model_configs_are_refused_before_allocating(tiny_model, tmp_path):
    from overheard.clap import load_clap_model
    from overheard.decoder import load_decoder
    d = _copy_model(os.path.join(tiny_model, "clap"), tmp_path / "clap")
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["text_config"]["num_hidden_layers"] = 10 ** 9  # hung the driver building layers
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    t = time.monotonic()
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_clap_model(d)
    dec = _copy_model(os.path.join(tiny_model, "decoder"), tmp_path / "decoder")
    meta = json.loads(open(os.path.join(dec, "config.json")).read())
    meta["decoder"]["n_embd"] = 1 << 16  # within bounds, but 10^10 parameters if built
    meta["decoder"]["n_head"] = 1
    open(os.path.join(dec, "config.json"), "w").write(json.dumps(meta))
    with pytest.raises(ValueError, match="shape mismatch|missing tensor"):
        load_decoder(dec)
    assert time.monotonic() - t < 30  # measured ~1 s: nothing of that size was allocated


def test_bad_model_stops_the_job_before_any_actor(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from jobs.caption import CaptionConfig, run
    m = tmp_path / "model"
    _copy_model(tiny_model, m)
    w = str(m / "clap" / "model.safetensors")
    sd = load_file(w)
    save_file({k: v for k, v in sd.items() if "text_projection" not in k}, w)
    mf.make_tone(str(tmp_path / "a.wav"), seconds=1.0, sr=16000, channels=1, freq=440)
    with pytest.raises(ValueError, match="invalid CLAP model.*missing tensor"):
        run(CaptionConfig(input=str(tmp_path / "a.wav"), output=str(tmp_path / "out"),
                          model=str(m), progress=False, show=0))
    assert not (tmp_path / "out").exists()


def test_out_of_memory_is_retryable_never_permanent(tmp_path):
    """A decode worker that runs out of memory (a real MemoryError under an address-space
    limit) ends as a retryable out_of_memory row, not a permanent corrupt one."""
    mf.make_tone(str(tmp_path / "long.wav"), seconds=400.0, sr=8000, channels=1, freq=200)
    code = f"""
import resource, sys
sys.path.insert(0, {ROOT!r})
from actors.windows import source_windows
from overheard.schema import RETRYABLE
import numpy as np
np.zeros(1)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (40 << 20), hard))
rows = list(source_windows({str(tmp_path / 'long.wav')!r}, 'v', window_s=300.0, hop_s=None,
                           min_window_s=0.5, pad_mode='repeatpad', max_duration_s=None,
                           timeout_s=60.0))
fail = [r for r in rows if r['window_index'] < 0]
print(fail[0]['error_type'] if fail else 'none', fail and fail[0]['error_type'] in RETRYABLE)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["out_of_memory", "True"], r.stdout


def test_damaged_part_is_quarantined_and_its_sources_redone(tmp_path):
    """A part cut short (full disk) used to crash every later run at start; now it is renamed
    .damaged-*, readers skip it, and its sources count as not done."""
    from jobs.sink import done_uris, quarantine_damaged, read_table_dir
    caps = tmp_path / "captions"
    caps.mkdir()
    pq.write_table(pa.table({"source_uri": ["a", "b"]}), caps / "part-1.parquet")
    pq.write_table(pa.table({"source_uri": ["c"]}), caps / "part-2.parquet")
    data = (caps / "part-2.parquet").read_bytes()
    (caps / "part-2.parquet").write_bytes(data[: len(data) // 2])
    moved = quarantine_damaged(str(tmp_path))
    assert moved == [str(caps / ".damaged-part-2.parquet")]
    assert sorted(done_uris(str(tmp_path)).to_pylist()) == ["a", "b"]
    assert read_table_dir(str(caps)).num_rows == 2

