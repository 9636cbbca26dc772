"""The sound world's sources: the vocabulary table and the signal synthesis of each source.

``SOURCES`` (``overheard/assets/soundworld_sources.json``): name -> description, kind, subjects
(synonyms) and verb forms [present, gerund] agreeing with them; kind: "event" (counted:
"twice"), "continuous" (can be a background), "speech". :func:`render` makes one source's
signal; numpy only, plus ``espeak-ng`` for speech and Debian's keyboard recordings for typing.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import subprocess
from typing import Any

import numpy as np

SR = 48_000
DURATION_S = 10.0
N_SAMPLES = int(SR * DURATION_S)
N_CAPTIONS = 5
BUCKLE_DIR = "/usr/share/buckle/wav"  # Debian package bucklespring-data
SOURCES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                            "soundworld_sources.json")
with open(SOURCES_FILE, encoding="utf-8") as _f:
    SOURCES: dict[str, dict[str, Any]] = json.load(_f)  # file order is the order scenes draw from
BACKGROUNDS = [n for n, s in SOURCES.items() if s["kind"] == "continuous"]
PHRASES = [
    "the meeting starts at noon", "please close the window", "I think it will rain today",
    "where did you put the keys", "the train is running late", "thank you very much",
    "can you hear me now", "let us go home", "the coffee is ready", "turn left at the corner",
    "we need more time", "good morning everyone",
]
MALE_VOICES = ["en-us+m1", "en-us+m3", "en+m2", "en-gb+m4"]
FEMALE_VOICES = ["en-us+f2", "en-us+f3", "en+f4", "en-gb+f1"]

# ----------------------------------------------------------------------------- signal helpers
def _env(n: int, attack: float, release: float) -> np.ndarray:
    """Linear attack, exponential-ish release envelope of n samples (seconds given)."""
    t = np.arange(n) / SR
    a = np.clip(t / max(attack, 1e-4), 0, 1)
    r = np.exp(-np.maximum(t - attack, 0) / max(release, 1e-4))
    return (a * r).astype(np.float32)


def _shaped_noise(rng: np.random.Generator, n: int, lo: float, hi: float, tilt: float = 0.0) -> np.ndarray:
    """White noise band-limited to [lo, hi] Hz with a spectral tilt (dB/octave) via one FFT.

    The FFT always runs on a fast length (480000 = 2^8 3 5^4, or a power of two) and is cut to n:
    arbitrary lengths with large prime factors make pocketfft tens of times slower."""
    m = N_SAMPLES if n <= N_SAMPLES else 1 << (n - 1).bit_length()
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.fft.rfftfreq(m, 1 / SR)
    mask = ((f >= lo) & (f <= hi)).astype(np.float64)
    if tilt:
        mask *= (np.maximum(f, 1.0) / 1000.0) ** (tilt / 6.02)
    x = np.fft.irfft(spec * mask, m)[:n]
    return (x / (np.std(x) + 1e-9)).astype(np.float32)


def _norm(x: np.ndarray) -> np.ndarray:
    """Scale to unit RMS over the active part (samples above 1% of peak)."""
    a = np.abs(x)
    act = a > 0.01 * (a.max() + 1e-12)
    rms = np.sqrt(np.mean(x[act] ** 2)) if act.any() else 1.0
    return (x / (rms + 1e-12)).astype(np.float32)


def _resample(x: np.ndarray, sr_in: int) -> np.ndarray:
    if sr_in == SR:
        return x.astype(np.float32)
    n_out = int(round(len(x) * SR / sr_in))
    return np.interp(np.arange(n_out) * (sr_in / SR), np.arange(len(x)), x).astype(np.float32)


# ----------------------------------------------------------------------------- sources
def _bark(rng) -> np.ndarray:
    dur = rng.uniform(0.14, 0.26)
    n = int(dur * SR)
    t = np.arange(n) / SR
    f0 = rng.uniform(380, 650) * (1 - 0.35 * t / dur)  # falling pitch
    ph = 2 * np.pi * np.cumsum(f0) / SR
    formant = rng.uniform(800, 1400)
    x = np.zeros(n)
    for h in range(1, 14):
        w = np.exp(-((h * f0.mean() - formant) / 900.0) ** 2) + 0.15 / h
        x += w * np.sin(h * ph)
    x += 0.4 * rng.standard_normal(n) * np.exp(-t / 0.03)
    return x * _env(n, 0.01, dur / 3)


def _beep(rng, hi: bool) -> np.ndarray:
    dur = rng.uniform(0.12, 0.4)
    n = int(dur * SR)
    f = rng.uniform(1600, 3000) if hi else rng.uniform(250, 500)
    t = np.arange(n) / SR
    x = np.sin(2 * np.pi * f * t) + (0.2 * np.sin(6 * np.pi * f * t) if not hi else 0)
    fade = np.minimum(1, np.minimum(t, dur - t) / 0.005)
    return x * fade


def _knock(rng) -> np.ndarray:
    n = int(0.12 * SR)
    t = np.arange(n) / SR
    x = np.zeros(n)
    for f, d in ((rng.uniform(140, 220), 0.035), (rng.uniform(380, 600), 0.02), (rng.uniform(900, 1400), 0.008)):
        x += np.sin(2 * np.pi * f * t) * np.exp(-t / d)
    x += 0.5 * rng.standard_normal(n) * np.exp(-t / 0.003)
    return x


def _events(rng, make, count: int, gap: tuple[float, float]) -> np.ndarray:
    parts = []
    for i in range(count):
        parts.append(make())
        if i < count - 1:
            parts.append(np.zeros(int(rng.uniform(*gap) * SR)))
    return np.concatenate(parts)


def _rain(rng, n: int) -> np.ndarray:
    x = 0.6 * _shaped_noise(rng, n, 300, 12000, tilt=-2.0)
    rate = rng.uniform(25, 60)  # droplets per second
    k = rng.poisson(rate * n / SR)
    pos = rng.integers(0, max(n - 2000, 1), size=k)
    drop = _env(1500, 0.0005, 0.004) * rng.standard_normal(1500).astype(np.float32)
    for p, g in zip(pos, rng.uniform(0.3, 1.5, size=k)):
        x[p:p + 1500] += g * drop
    return x


def _engine(rng, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    f0 = rng.uniform(24, 45) * (1 + 0.01 * np.sin(2 * np.pi * 0.3 * t))
    ph = 2 * np.pi * np.cumsum(f0) / SR
    x = sum((1.0 / h ** 0.7) * np.sin(h * ph + rng.uniform(0, 6.28)) for h in range(1, 11))
    x = x * (1 + 0.35 * np.sin(ph / 2))  # firing modulation
    return x + 0.3 * _shaped_noise(rng, n, 20, 600)


def _siren(rng, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    lo, hi = rng.uniform(550, 800), rng.uniform(1200, 1700)
    period = rng.choice([rng.uniform(2.0, 4.0), rng.uniform(0.25, 0.45)])  # wail or yelp
    f = lo + (hi - lo) * 0.5 * (1 - np.cos(2 * np.pi * t / period + rng.uniform(0, 6.28)))
    ph = 2 * np.pi * np.cumsum(f) / SR
    return np.sin(ph) + 0.3 * np.sin(2 * ph) + 0.15 * np.sin(3 * ph)


def _birds(rng, n: int) -> np.ndarray:
    x = np.zeros(n, dtype=np.float32)
    pos = 0.0
    while True:
        pos += rng.uniform(0.15, 1.0)
        start = int(pos * SR)
        if start >= n:
            break
        f_lo, f_hi = rng.uniform(2500, 4000), rng.uniform(4200, 7000)
        up = rng.random() < 0.6
        for _ in range(int(rng.integers(1, 6))):  # a trill of chirps
            d = rng.uniform(0.04, 0.12)
            m = int(d * SR)
            tt = np.arange(m) / SR
            f = np.linspace(f_lo, f_hi, m) if up else np.linspace(f_hi, f_lo, m)
            c = np.sin(2 * np.pi * np.cumsum(f) / SR) * np.sin(np.pi * tt / d) ** 2
            end = min(start + m, n)
            x[start:end] += c[: end - start] * rng.uniform(0.5, 1.0)
            start += m + int(rng.uniform(0.02, 0.08) * SR)
            if start >= n:
                break
        pos = start / SR
    return x


@functools.lru_cache(maxsize=1)
def _buckle_clips() -> tuple[np.ndarray, ...]:
    import soundfile as sf

    clips = []
    for p in sorted(glob.glob(os.path.join(BUCKLE_DIR, "*.wav"))):
        x, sr = sf.read(p, dtype="float32", always_2d=True)
        clips.append(_resample(x.mean(axis=1), sr))
    return tuple(clips)


def has_recordings() -> bool:
    return len(_buckle_clips()) > 0


def _typing(rng, n: int) -> np.ndarray:
    clips = _buckle_clips()
    x = np.zeros(n, dtype=np.float32)
    pos = int(rng.uniform(0, 0.1) * SR)
    while pos < n:
        if clips:
            k = int(rng.integers(0, len(clips) // 2)) * 2  # press (-0) then release (-1)
            press, release = clips[k], clips[min(k + 1, len(clips) - 1)]
        else:  # synthetic fallback: two clicks
            press = (rng.standard_normal(1200) * _env(1200, 0.0003, 0.002)).astype(np.float32)
            release = 0.5 * press
        hold = int(rng.uniform(0.05, 0.12) * SR)
        for seg, off in ((press, pos), (release, pos + hold)):
            end = min(off + len(seg), n)
            if off < n:
                x[off:end] += seg[: end - off]
        pos += int(rng.uniform(0.08, 0.35) * SR) + (int(rng.uniform(0.3, 0.8) * SR) if rng.random() < 0.1 else 0)
    return x


@functools.lru_cache(maxsize=512)
def _speak(voice: str, speed: int, phrase: str) -> np.ndarray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (scripts/setup.sh installs it)")
    wav = subprocess.run([exe, "-v", voice, "-s", str(speed), "--stdout", phrase],
                         check=True, capture_output=True).stdout
    import io

    import soundfile as sf

    # espeak-ng writes a streaming WAV header (unknown length); soundfile reads it as raw frames.
    try:
        x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    except Exception:  # header with a bogus length: decode the PCM payload after the 44-byte header
        x, sr = np.frombuffer(wav[44:], dtype="<i2").astype(np.float32) / 32768.0, 22050
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1).mean(axis=1)
    nz = np.nonzero(np.abs(x) > 1e-3)[0]
    if len(nz):
        x = x[nz[0]:nz[-1] + 1]
    return _resample(x, sr)


def _speech(rng, voices: list[str], max_s: float) -> tuple[np.ndarray, list[str]]:
    voice = voices[int(rng.integers(len(voices)))]
    speed = int(rng.choice([140, 160, 180]))
    said, parts = [], []
    total = 0
    for _ in range(int(rng.integers(1, 3))):
        ph = PHRASES[int(rng.integers(len(PHRASES)))]
        y = _speak(voice, speed, ph)
        if (total + len(y)) / SR > max_s and parts:
            break
        parts += [y, np.zeros(int(0.25 * SR), dtype=np.float32)]
        said.append(ph)
        total += len(y) + int(0.25 * SR)
    x = np.concatenate(parts[:-1]) if parts else np.zeros(1, np.float32)
    return x[: int(max_s * SR)], said


def render(name: str, rng: np.random.Generator, dur_s: float, count: int) -> tuple[np.ndarray, dict]:
    """Signal for one source: events use ``count``, continuous sources fill ``dur_s``."""
    n = int(dur_s * SR)
    extra: dict[str, Any] = {}
    if name == "dog":
        x = _events(rng, lambda: _bark(rng), count, (0.2, 0.5))
    elif name in ("beep_high", "beep_low"):
        x = _events(rng, lambda: _beep(rng, name == "beep_high"), count, (0.15, 0.5))
    elif name == "knock":
        x = _events(rng, lambda: _knock(rng), count, (0.12, 0.3))
    elif name == "rain":
        x = _rain(rng, n)
    elif name == "engine":
        x = _engine(rng, n)
    elif name == "siren":
        x = _siren(rng, n)
    elif name == "birds":
        x = _birds(rng, n)
    elif name == "typing":
        x = _typing(rng, n)
    elif name in ("man", "woman"):
        x, said = _speech(rng, MALE_VOICES if name == "man" else FEMALE_VOICES, dur_s)
        extra["said"] = said
    else:
        raise KeyError(name)
    x = np.asarray(x, dtype=np.float32)
    if SOURCES[name]["kind"] == "continuous":  # gentle fades so backgrounds do not click
        m = min(int(0.05 * SR), len(x) // 2)
        ramp = np.linspace(0, 1, m, dtype=np.float32)
        x[:m] *= ramp
        x[len(x) - m:] *= ramp[::-1]
    return _norm(x), extra


def event_len_s(rng, name: str, count: int) -> float:
    per = {"dog": 0.55, "beep_high": 0.55, "beep_low": 0.55, "knock": 0.32}[name]
    return count * per
