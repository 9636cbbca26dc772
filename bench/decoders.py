"""Decoder choice benchmark: decode + resample to 48 kHz mono, time and agreement with the ffmpeg CLI.

Candidates (all produce float32 mono at 48 kHz):
  * pyav        - overheard.media.iter_audio: PyAV demux/decode + libswresample, streamed (our path)
  * decord2     - decord.AudioReader(path, sample_rate=48000, mono=True)[:] (reads the whole file)
  * soundfile   - libsndfile decode, channel mean in numpy, then libswresample through PyAV (soundfile
                  has no resampler and none ships in our venv: no scipy/soxr/resampy); cannot read mp4/aac
  * ffmpeg-cli  - `ffmpeg -i f -af "aformat=sample_fmts=fltp,pan=mono|c0=0.5*c0+0.5*c1" -ar 48000 -f f32le -`
                  in a subprocess (the reference). All candidates downmix by the MEAN of the channels,
                  as overheard.media does (see its docstring): FFmpeg's default `-ac 1` matrix gives
                  0.7071 * (L + R) for stereo, +3 dB over the mean, and would not be a fair reference.

Media (generated here, deterministic, 44.1 kHz stereo: pink noise left, 440 Hz + 3 kHz tones right):
five 10-s AAC-in-mp4 clips, five 10-s mp3 clips, one 10-min flac.

Reproduce:
    cd /work/main && .venv/bin/python bench/decoders.py            # ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from overheard.media import _mean_gains, iter_audio  # noqa: E402

SR = 48000
COMMAND = "cd /work/main && .venv/bin/python bench/decoders.py"
FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]


# ------------------------------------------------------------------------------------------- media

def make_source(path: Path, seconds: float, seed: int, codec: list[str]) -> Path:
    """44.1 kHz stereo: left pink noise (seeded), right 440 Hz + 3 kHz tones, encoded with ``codec``."""
    cmd = FFMPEG + [
        "-f", "lavfi", "-i", f"anoisesrc=color=pink:sample_rate=44100:amplitude=0.2:seed={seed}:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=3000:sample_rate=44100:duration={seconds}",
        "-filter_complex", "[1:a][2:a]amix=inputs=2,aformat=sample_fmts=fltp[r];[0:a]aformat=sample_fmts=fltp[l];[l][r]join=inputs=2:channel_layout=stereo[out]",
        "-map", "[out]", *codec, "-ar", "44100", "-fflags", "+bitexact", str(path)]
    subprocess.run(cmd, check=True)
    return path


def make_media(d: Path) -> dict[str, list[Path]]:
    """The benchmark's inputs, keyed by row label."""
    return {
        "10-s AAC in mp4 (x5)": [make_source(d / f"clip{i}.mp4", 10, 10 + i, ["-c:a", "aac", "-b:a", "128k"])
                                 for i in range(5)],
        "10-s mp3 (x5)": [make_source(d / f"clip{i}.mp3", 10, 20 + i, ["-c:a", "libmp3lame", "-b:a", "128k"])
                          for i in range(5)],
        "10-min flac": [make_source(d / "long.flac", 600, 30, ["-c:a", "flac"])],
    }


# ---------------------------------------------------------------------------------------- decoders

def dec_pyav(path: Path) -> np.ndarray:
    return np.concatenate(list(iter_audio(str(path), sr=SR)))


def dec_decord(path: Path) -> np.ndarray:
    import decord
    return decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=SR, mono=True)[:].asnumpy().reshape(-1)


def dec_soundfile(path: Path) -> np.ndarray:
    import soundfile as sf
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (n, channels)
    # mean of the channels (what overheard.media and LAION-CLAP's librosa.load(mono=True) do), then
    # libswresample via PyAV on the one mono channel.
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono.reshape(1, -1)), format="flt",
                                       layout="mono")
    frame.sample_rate = rate
    r = av.AudioResampler(format="flt", layout="mono", rate=SR)
    out = [f.to_ndarray().reshape(-1) for f in r.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in r.resample(None)]
    return np.concatenate(out)


def _channels(path: Path) -> int:
    with av.open(str(path)) as c:
        return c.streams.audio[0].codec_context.channels


def dec_ffmpeg(path: Path) -> np.ndarray:
    """The reference: the channel mean via FFmpeg's pan filter (in float), then resampling to 48 kHz,
    e.g. ``-af "aformat=sample_fmts=fltp,pan=mono|c0=0.5*c0+0.5*c1"`` for stereo."""
    n = _channels(path)
    mix = ["-af", f"aformat=sample_fmts=fltp,pan={_mean_gains(n)}"] if n > 1 else ["-ac", "1"]
    out = subprocess.run(FFMPEG + ["-i", str(path), *mix, "-ar", str(SR), "-f", "f32le", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(out, dtype=np.float32)


DECODERS = {"pyav (ours)": dec_pyav, "decord2": dec_decord, "soundfile + swr": dec_soundfile,
            "ffmpeg CLI": dec_ffmpeg}


# ------------------------------------------------------------------------------------------ measure

def agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, int]:
    """(max abs error, SNR dB, length difference in samples) over the common length."""
    n = min(ref.size, got.size)
    diff = ref[:n].astype(np.float64) - got[:n]
    err = float(np.sum(diff ** 2))
    snr = float("inf") if err == 0 else 10 * np.log10(float(np.sum(ref[:n].astype(np.float64) ** 2)) / err)
    return float(np.max(np.abs(diff))) if n else float("nan"), snr, got.size - ref.size


def bench(files: list[Path], fn, repeats: int, long: bool) -> tuple[float, list[np.ndarray]]:
    """Median seconds per file and the decoded arrays. Short clips: one warm-up round (imports, page
    cache) then ``repeats`` timed rounds. Long files: a single timed run (decord2 takes >10 s on the
    10-min flac; repeating it would blow the 2-minute budget)."""
    outs = [] if long else [fn(p) for p in files]
    times = []
    for _ in range(1 if long else repeats):
        for p in files:
            t = time.perf_counter()
            out = fn(p)
            times.append(time.perf_counter() - t)
            if long:
                outs.append(out)
    return statistics.median(times), outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per file (after a warm-up)")
    ap.add_argument("--workdir", default=None, help="where to generate media (default: a temp dir)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        media = make_media(d)
        gen_s = time.perf_counter() - t0
        import decord
        print(f"Reproduce: `{COMMAND}`\n")
        print(f"Versions: PyAV {av.__version__} (FFmpeg {'.'.join(map(str, av.library_versions['libavcodec']))} "
              f"libavcodec), decord2 {decord.__version__}, soundfile/libsndfile "
              f"{__import__('soundfile').__libsndfile_version__}, "
              f"{subprocess.run(['ffmpeg', '-version'], capture_output=True, text=True).stdout.split()[2]} ffmpeg CLI; "
              f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}; media generated in {gen_s:.1f} s.\n")
        print("Decode + resample to 48 kHz mono, single process, median wall time per file over "
              f"{args.repeats} rounds after 1 warm-up (10-min flac: one cold run); ffmpeg CLI time includes\n"
              "process start-up. Agreement: worst file vs the ffmpeg CLI output.\n")
        print("| input | decoder | time per file | x real time | max abs err vs ffmpeg | SNR vs ffmpeg | length diff (samples) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for label, files in media.items():
            dur = float(av.open(str(files[0])).duration) / av.time_base
            refs = [dec_ffmpeg(p) for p in files]
            for name, fn in DECODERS.items():
                try:
                    med, outs = bench(files, fn, args.repeats, long=dur > 60)
                except Exception as e:  # noqa: BLE001 - report a decoder that cannot read the format
                    why = str(e).splitlines()[0].rsplit(": ", 1)[-1][:50]
                    print(f"| {label} | {name} | n/a: {type(e).__name__} ({why}) | | | | |")
                    continue
                ag = [agreement(r, o) for r, o in zip(refs, outs)]
                err = max(a[0] for a in ag)
                snr = min(a[1] for a in ag)
                ldiff = max((a[2] for a in ag), key=abs)
                snr_s = "identical" if snr == float("inf") else f"{snr:.1f} dB"
                print(f"| {label} | {name} | {med * 1000:.0f} ms | {dur / med:.0f}x | {err:.2g} | {snr_s} | {ldiff:+d} |")
        print(f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
