"""Audio from outside the sound world, for measuring confidence: silence, noise, chords, speech.

Every clip is 10 s, 48 kHz mono float32 and a deterministic function of (kind, seed)::

    audio = make_clip("pink", 3)

Kinds (what issue 18 found the sound-world model captions fluently anyway):
- ``silence``: digital zero plus a faint noise floor (-80 dBFS);
- ``white`` / ``pink`` / ``brown``: noise with a flat, 1/f or 1/f^2 power spectrum (numpy, seeded:
  what ``sox synth whitenoise/pinknoise/brownnoise`` makes, but repeatable) at -35 to -12 dBFS;
- ``chord``: three notes of a random major/minor triad (sox ``pluck`` or ``sine``), restruck;
- ``speech``: ``espeak-ng`` reading two long sentences (the world's own speech is short phrases).

No Ray, no torch: numpy, soundfile and the ``sox`` / ``espeak-ng`` command-line tools.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import numpy as np

SR = 48_000
N_SAMPLES = 10 * SR
KINDS = ("silence", "white", "pink", "brown", "chord", "speech")
_NOTES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
_SENTENCES = [
    "The committee will meet again on Thursday to discuss the budget for next year.",
    "Please remember to bring your own notebook and a pen to the first lecture.",
    "Yesterday the museum opened a new exhibition about the history of navigation.",
    "Our train was delayed by forty minutes because of the heavy snow near the border.",
    "She explained the rules of the game slowly so that everybody could follow them.",
    "In the afternoon we walked along the river and talked about our summer plans.",
]
_VOICES = ["en", "en-us", "en-gb-x-rp", "en+m3", "en+f2", "en-us+f4", "de", "fr"]


def _sox(args: list[str]) -> np.ndarray:
    import soundfile as sf

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.wav")
        subprocess.run(["sox", "-R", "-n", "-r", str(SR), "-c", "1", "-b", "16", path] + args,
                       check=True, capture_output=True, timeout=60)
        x, _ = sf.read(path, dtype="float32")
    return _fit(x)


def _fit(x: np.ndarray) -> np.ndarray:
    out = np.zeros(N_SAMPLES, np.float32)
    out[: min(len(x), N_SAMPLES)] = x[:N_SAMPLES]
    return out


def _level(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x ** 2))) + 1e-12
    return (x * (10 ** (dbfs / 20) / rms)).astype(np.float32)


def make_clip(kind: str, seed: int) -> np.ndarray:
    """One 10-s clip of ``kind`` (see KINDS)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, KINDS.index(kind)])
    if kind == "silence":
        return (1e-4 * rng.standard_normal(N_SAMPLES)).astype(np.float32)
    if kind in ("white", "pink", "brown"):
        return _level(_noise(rng, kind), float(rng.uniform(-35, -12)))
    if kind == "chord":
        root = int(rng.integers(0, 12))
        third = 3 if rng.random() < 0.5 else 4
        octave = int(rng.integers(3, 5))
        names = [f"{_NOTES[(root + k) % 12]}{octave + (root + k) // 12}" for k in (0, third, 7)]
        voice = "pluck" if rng.random() < 0.5 else "sine"
        strike = float(rng.uniform(1.5, 3.0))
        one = _sox(["synth", f"{strike:.2f}"] + [a for n in names for a in (voice, n)])[: int(strike * SR)]
        x = np.tile(one, int(np.ceil(N_SAMPLES / len(one))))[:N_SAMPLES]
        return _level(x, float(rng.uniform(-26, -16)))
    if kind == "speech":
        import soundfile as sf
        from scipy.signal import resample_poly

        text = " ".join(rng.choice(_SENTENCES, size=2, replace=False))
        voice = _VOICES[int(rng.integers(len(_VOICES)))]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s.wav")
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(rng.integers(140, 190))), "-w", path, text],
                           check=True, capture_output=True, timeout=60)
            x, sr = sf.read(path, dtype="float32")
        x = resample_poly(x, SR, sr).astype(np.float32)
        return _level(_fit(x), float(rng.uniform(-26, -18)))
    raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


def _noise(rng: np.random.Generator, kind: str) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f^2) noise, shaped in the frequency domain."""
    white = rng.standard_normal(N_SAMPLES)
    if kind == "white":
        return white.astype(np.float32)
    spec = np.fft.rfft(white)
    f = np.fft.rfftfreq(N_SAMPLES, 1 / SR)
    f[0] = f[1]
    spec /= f ** (0.5 if kind == "pink" else 1.0)
    return np.fft.irfft(spec, N_SAMPLES).astype(np.float32)


def write_clips(out_dir: str, n_per_kind: int, seed: int = 0, kinds=KINDS) -> list[tuple[str, str]]:
    """``n_per_kind`` clips of each kind as ``out_dir/<kind>_<i>.flac``; returns [(path, kind)]."""
    import soundfile as sf

    os.makedirs(out_dir, exist_ok=True)
    out = []
    for kind in kinds:
        for i in range(n_per_kind):
            path = os.path.join(out_dir, f"{kind}_{i:03d}.flac")
            sf.write(path, make_clip(kind, seed * 1000 + i), SR, subtype="PCM_16")
            out.append((path, kind))
    return out
