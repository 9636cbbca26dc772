"""A small, learnable "sound world": 10-s audio scenes with compositional captions.

Every scene is a deterministic function of one integer seed: 1-3 sound sources mixed at chosen
times and levels, plus five reference captions written from templates with synonyms and temporal
relations (like Clotho's five captions per clip)::

    audio, captions, meta = make_scene(7)
    # captions[0] == "A dog barks twice while rain falls" (for example)
    # meta["sources"] == [{"name": "rain", "onset": 0.2, "offset": 9.7, ...}, {"name": "dog", ...}]

Sources:
- recorded: ``typing`` uses the real keyboard recordings of Debian's ``bucklespring-data``
  (``/usr/share/buckle/wav/*.wav``, IBM Model M key presses/releases, 44.1 kHz); when that
  package is missing a synthetic click is used instead and ``meta["recorded"]`` says so.
- speech: ``espeak-ng`` voices (male ``+m*``/female ``+f*`` variants) saying short sentences,
  cached per (voice, speed, phrase) in this process.
- synthesised with numpy: high/low beeps, sirens (frequency sweeps), rain (shaped noise plus
  droplets), engine hum, knocks, bird chirps, dog-bark-like harmonic bursts.

No Ray, no torch: numpy, soundfile and the two command-line tools.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import shutil
import subprocess
import zlib
from typing import Any

import numpy as np

SR = 48_000
DURATION_S = 10.0
N_SAMPLES = int(SR * DURATION_S)
N_CAPTIONS = 5
BUCKLE_DIR = "/usr/share/buckle/wav"  # Debian package bucklespring-data

# name -> description, kind, subjects (synonyms) and verb forms (present, gerund) agreeing with them.
# kind: "event" (counted: "twice"), "continuous" (can be a background), "speech".
SOURCES: dict[str, dict[str, Any]] = {
    "dog": {
        "description": "a dog barking (harmonic bursts with a falling pitch)",
        "kind": "event",
        "subjects": ["a dog", "a dog", "a small dog", "a large dog"],
        "verbs": [("barks", "barking"), ("barks", "barking"), ("woofs", "woofing")],
    },
    "beep_high": {
        "description": "short high-pitched electronic beeps (1.6-3 kHz sine tones)",
        "kind": "event",
        "subjects": ["a high beep", "a high-pitched beep", "a shrill beep", "a high electronic beep"],
        "verbs": [("sounds", "sounding"), ("goes off", "going off"), ("rings out", "ringing out")],
    },
    "beep_low": {
        "description": "short low-pitched electronic beeps (250-500 Hz tones)",
        "kind": "event",
        "subjects": ["a low beep", "a low-pitched beep", "a deep beep", "a low electronic tone"],
        "verbs": [("sounds", "sounding"), ("goes off", "going off"), ("rings out", "ringing out")],
    },
    "knock": {
        "description": "knocks on a wooden door (damped low resonances)",
        "kind": "event",
        "subjects": ["someone", "a person", "somebody"],
        "verbs": [("knocks on a door", "knocking on a door"), ("knocks on wood", "knocking on wood"),
                  ("raps on a door", "rapping on a door"), ("knocks", "knocking")],
    },
    "rain": {
        "description": "rain (broadband shaped noise with droplets)",
        "kind": "continuous",
        "subjects": ["rain", "heavy rain", "the rain", "steady rain"],
        "verbs": [("falls", "falling"), ("pours down", "pouring down"), ("patters", "pattering")],
    },
    "engine": {
        "description": "an idling engine (low harmonic hum with firing modulation)",
        "kind": "continuous",
        "subjects": ["an engine", "a motor", "a car engine", "a vehicle engine"],
        "verbs": [("idles", "idling"), ("hums", "humming"), ("runs", "running"), ("rumbles", "rumbling")],
    },
    "siren": {
        "description": "a siren (a tone sweeping up and down)",
        "kind": "continuous",
        "subjects": ["a siren", "an emergency siren", "a police siren", "an alarm siren"],
        "verbs": [("wails", "wailing"), ("blares", "blaring"), ("sounds", "sounding")],
    },
    "birds": {
        "description": "birds chirping (fast high frequency sweeps in trills)",
        "kind": "continuous",
        "plural": True,
        "subjects": ["birds", "some birds", "small birds", "several birds"],
        "verbs": [("chirp", "chirping"), ("sing", "singing"), ("tweet", "tweeting")],
    },
    "typing": {
        "description": "typing on a mechanical keyboard (recorded: bucklespring-data)",
        "kind": "continuous",
        "subjects": ["someone", "a person", "somebody"],
        "verbs": [("types on a keyboard", "typing on a keyboard"), ("types", "typing"),
                  ("types on a computer keyboard", "typing on a computer keyboard"),
                  ("clicks away at a keyboard", "clicking away at a keyboard")],
    },
    "man": {
        "description": "a man speaking (espeak-ng male voices)",
        "kind": "speech",
        "subjects": ["a man", "a male voice", "a man", "a male speaker"],
        "verbs": [("speaks", "speaking"), ("talks", "talking"), ("says something", "saying something")],
    },
    "woman": {
        "description": "a woman speaking (espeak-ng female voices)",
        "kind": "speech",
        "subjects": ["a woman", "a female voice", "a woman", "a female speaker"],
        "verbs": [("speaks", "speaking"), ("talks", "talking"), ("says something", "saying something")],
    },
}
BACKGROUNDS = [n for n, s in SOURCES.items() if s["kind"] == "continuous"]
COUNT_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times"}
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


def _render(name: str, rng: np.random.Generator, dur_s: float, count: int) -> tuple[np.ndarray, dict]:
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


def _event_len_s(rng, name: str, count: int) -> float:
    per = {"dog": 0.55, "beep_high": 0.55, "beep_low": 0.55, "knock": 0.32}[name]
    return count * per


# ----------------------------------------------------------------------------- captions
def _phrase(rng, src: dict, gerund: bool) -> str:
    spec = SOURCES[src["name"]]
    subj = spec["subjects"][int(rng.integers(len(spec["subjects"])))]
    present, ger = spec["verbs"][int(rng.integers(len(spec["verbs"])))]
    words = [subj, ger if gerund else present]
    if spec["kind"] == "event" and (src["count"] > 1 or rng.random() < 0.3) and rng.random() < 0.8:
        words.append(COUNT_WORDS.get(src["count"], "several times"))
    if src.get("role") == "background" and src["gain_db"] < -9 and rng.random() < 0.3:
        words.append("in the distance" if src["name"] in ("siren", "engine", "dog") else "softly")
    return " ".join(words)


_SINGLE = ["{c}", "{g}", "{g} can be heard", "there is {g}", "you can hear {g}", "the sound of {g}"]
_SEQ = ["{c1}, then {c2}", "{g1} followed by {g2}", "{c1} and then {c2}", "first {c1}, then {c2}",
        "{c1} before {c2}", "{c2} after {c1}", "{g1}, then {g2}"]
_OVER = ["{cf} while {cb}", "{cf} as {cb}", "{gf} with {gb} in the background", "{cb} while {cf}",
         "{gb} and {gf}", "{cf} over the sound of {gb}", "{gf} while {cb}"]
_THREE = ["{c1}, then {c2}, while {cb}", "{g1} followed by {g2} with {gb} in the background",
          "{cb} as {c1} and then {c2}", "while {cb}, {c1} and then {c2}",
          "{c1} followed by {g2} as {cb}", "{g1} and then {g2} while {cb}", "{gb} as {c1}, then {c2}"]


def _captions(rng, meta: dict) -> list[str]:
    srcs = meta["sources"]
    bg = [s for s in srcs if s["role"] == "background"]
    fg = sorted([s for s in srcs if s["role"] != "background"], key=lambda s: s["onset"])
    if len(srcs) == 1:
        templates = _SINGLE
    elif bg and len(fg) == 1:
        templates = _OVER
    elif bg:
        templates = _THREE
    else:
        templates = _SEQ
    order = rng.permutation(len(templates))
    out: list[str] = []
    attempts = 0
    while len(out) < N_CAPTIONS and attempts < 50:
        tpl = templates[int(order[len(out) % len(order)])] if attempts < len(templates) else \
            templates[int(rng.integers(len(templates)))]
        attempts += 1
        fill = {}
        if len(srcs) == 1:
            fill = {"c": _phrase(rng, srcs[0], False), "g": _phrase(rng, srcs[0], True)}
        else:
            if bg:
                fill.update(cb=_phrase(rng, bg[0], False), gb=_phrase(rng, bg[0], True))
            if len(fg) == 1 and bg:
                fill.update(cf=_phrase(rng, fg[0], False), gf=_phrase(rng, fg[0], True))
            for i, s in enumerate(fg[:2], 1):
                fill.update({f"c{i}": _phrase(rng, s, False), f"g{i}": _phrase(rng, s, True)})
        cap = tpl.format(**fill)
        cap = cap[0].upper() + cap[1:]
        if cap not in out:
            out.append(cap)
    return out


# ----------------------------------------------------------------------------- scenes
def make_scene(seed: int) -> tuple[np.ndarray, list[str], dict]:
    """One 10-s, 48 kHz mono scene: ``(audio float32 (480000,), 5 captions, meta)``.

    meta: ``seed``, ``relation`` ("single" | "sequence" | "overlap" | "overlap_sequence"),
    ``sources`` (list of dicts: name, role, onset, offset, count, gain_db[, said]),
    ``recorded`` (whether the keyboard recordings were available), ``rms_dbfs``, ``peak``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x50D]))
    names = list(SOURCES)
    k = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    if k == 1:
        relation = "single"
        chosen = [names[int(rng.integers(len(names)))]]
    elif k == 2 and rng.random() < 0.5:
        relation = "sequence"
        chosen = list(rng.choice(names, size=2, replace=False))
    else:
        relation = "overlap" if k == 2 else "overlap_sequence"
        b = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        rest = [n for n in names if n != b]
        chosen = [b] + list(rng.choice(rest, size=k - 1, replace=False))
    chosen = [str(c) for c in chosen]

    mix = np.zeros(N_SAMPLES, dtype=np.float32)
    sources: list[dict] = []
    cursor = rng.uniform(0.2, 1.2)  # for sequences
    n_seq = len(chosen) - (1 if relation.startswith("overlap") else 0)
    placed = 0
    for i, name in enumerate(chosen):
        kind = SOURCES[name]["kind"]
        count = int(rng.integers(1, 5)) if kind == "event" else 0
        role = "background" if (relation.startswith("overlap") and i == 0) else "foreground"
        if role == "background":
            onset, offset = rng.uniform(0.0, 0.6), DURATION_S - rng.uniform(0.0, 0.6)
            gain_db = rng.uniform(-14, -6)
        elif relation == "single":
            dur = _event_len_s(rng, name, count) if kind == "event" else rng.uniform(3.0, 9.5)
            onset = rng.uniform(0.1, max(0.2, DURATION_S - dur - 0.1))
            offset = min(onset + dur, DURATION_S)
            gain_db = 0.0
        else:  # the i-th of n_seq foreground slots, in time order
            slot_end = cursor + (DURATION_S - 0.2 - cursor) / (n_seq - placed)
            placed += 1
            if kind == "event":
                count = max(1, min(count, int((slot_end - cursor) / _event_len_s(rng, name, 1))))
                dur = _event_len_s(rng, name, count)
            else:
                dur = min(rng.uniform(2.0, 4.0), slot_end - cursor)
            onset, offset = cursor, min(cursor + dur, DURATION_S)
            cursor = offset + rng.uniform(0.3, 0.8)
            gain_db = rng.uniform(-3, 0)
        x, extra = _render(name, rng, offset - onset, count)
        start = int(onset * SR)
        x = x[: N_SAMPLES - start]
        mix[start:start + len(x)] += (10 ** (gain_db / 20)) * x
        offset = onset + len(x) / SR if kind != "continuous" else offset
        sources.append({"name": name, "role": role, "onset": round(float(onset), 3),
                        "offset": round(float(min(offset, DURATION_S)), 3), "count": count,
                        "gain_db": round(float(gain_db), 2), **extra})

    target_dbfs = rng.uniform(-26, -18)
    rms = float(np.sqrt(np.mean(mix ** 2))) + 1e-12
    mix *= 10 ** (target_dbfs / 20) / rms
    peak = float(np.abs(mix).max())
    if peak > 0.95:
        mix *= 0.95 / peak
    mix += (1e-4 * rng.standard_normal(N_SAMPLES)).astype(np.float32)  # a faint noise floor
    mix = mix.astype(np.float32)
    meta = {"seed": int(seed), "relation": relation, "sources": sources, "recorded": has_recordings(),
            "rms_dbfs": round(20 * float(np.log10(np.sqrt(np.mean(mix ** 2)) + 1e-12)), 2),
            "peak": round(float(np.abs(mix).max()), 4)}
    caption_rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xCA9]))
    return mix, _captions(caption_rng, meta), meta


def clip_seed(seed: int, split: str, index: int) -> int:
    """The scene seed of clip ``index`` of ``split`` in a dataset made with ``seed``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode()), int(index)])
    return int(ss.generate_state(1)[0])


def write_dataset(out_dir: str, n: int, seed: int = 0, split: str = "train", fmt: str = "flac") -> str:
    """Write ``n`` scenes as ``out_dir/<split>/<split>_<i>.flac`` plus captions tables.

    ``out_dir/<split>/captions.csv`` (Clotho layout: file_name, caption_1..caption_5, plus
    ``sources``) and ``captions.parquet`` (same columns + ``file``, ``seed``, ``relation``,
    ``meta`` as JSON). ``file`` is relative to the split folder. Returns the split folder.
    """
    import soundfile as sf

    d = os.path.join(out_dir, split)
    os.makedirs(d, exist_ok=True)
    rows = []
    for i in range(n):
        s = clip_seed(seed, split, i)
        audio, caps, meta = make_scene(s)
        fname = f"{split}_{i:05d}.{fmt}"
        sf.write(os.path.join(d, fname), audio, SR, subtype="PCM_16")
        row = {"file": fname, "file_name": fname}
        row.update({f"caption_{j + 1}": caps[j] for j in range(N_CAPTIONS)})
        row.update({"sources": " ".join(sorted({x["name"] for x in meta["sources"]})), "seed": s,
                    "relation": meta["relation"], "meta": json.dumps(meta)})
        rows.append(row)
    csv_cols = ["file_name"] + [f"caption_{j + 1}" for j in range(N_CAPTIONS)] + ["sources"]
    with open(os.path.join(d, "captions.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["file"] + csv_cols[1:] + ["seed", "relation", "meta"]
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), os.path.join(d, "captions.parquet"))
    return d


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write a sound-world dataset")
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train")
    a = ap.parse_args(argv)
    print(write_dataset(a.out_dir, a.n, a.seed, a.split))


if __name__ == "__main__":
    main()
