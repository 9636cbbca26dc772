"""Model stage for DALI models: caption each window with a frozen LLaVA-class captioner fed the
window's aligned audio tokens, or its audio tokens plus the video frame at the window's midpoint.
One actor does the whole model work (CLAP tower + LLaVA): passing 64 x 1024 audio tokens per window
between two actor pools would move 256 KB per window through the object store for nothing.

Columns in:  the window row of ``overheard.schema`` with ``samples`` (the real float32 samples),
             plus in ``audio+image`` mode ``frame``: large_binary, uint8 RGB S x S x 3 (S = the
             LLaVA image size) or b"" when the source has no usable video at that time.
Columns out: the window row minus ``samples``/``frame``, plus
    audio_embedding: fixed_size_list<float32>[D]  CLAP embedding (same pass as the audio tokens)
    caption: str, logprob: float32 (mean token log-probability; NaN on failure rows)
    decoding: str  "dali-audio/greedy" or "dali-audio+image/greedy" (``/t0.2`` when sampling):
                   per row, so an audio-only file in an AV archive says it was captioned from audio
    has_frame: bool  the caption saw the window's video frame
    clap_id: str   the DALI model's CLAP tower's id (the embedding's space)
    decoder_id, model_id: str  the DALI model's id
Captioning is ``overheard.dali.captioning.caption_windows`` (rows of one mode generated together;
a batch that raises is retried row by row), so one bad window becomes one ``model_error`` row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actors.device import limit_threads, pick_device, pick_dtype
from overheard.dali.captioning import caption_windows, row_seed
from overheard.dali.model import DaliModel
from overheard.media import model_input
from overheard.schema import Failures, add_columns, window_samples


class DaliCaptioner:
    def __init__(self, model_path: str, dali, window_s: float = 10.0, device: str = "auto",
                 resources=None):
        """``dali``: the caption job's ``DaliConfig`` (mode, sample_temperature, max_new_tokens);
        ``resources``: its ``ResourceConfig`` (dtype, torch_threads), None = float32, torch's
        threads as they are. Any object with those attributes will do."""
        mode = dali.mode
        if mode not in ("audio", "audio+image"):
            raise ValueError(f"mode must be 'audio' or 'audio+image', got {mode!r}")
        limit_threads(resources.torch_threads if resources is not None else None)
        self.device = pick_device(device)
        dtype = resources.dtype if resources is not None else "float32"
        self.model = DaliModel(model_path, device=self.device, dtype=pick_dtype(dtype))
        self.mode, self.temperature = mode, float(dali.sample_temperature)
        self.max_new_tokens = dali.max_new_tokens or self.model.cfg.max_new_tokens
        self.sr = self.model.clap.sampling_rate
        self.window_samples = int(round(window_s * self.sr))
        self.size = self.model.llava.image_size
        self.model_id = self.model.model_id
        search = f"t{self.temperature:g}" if self.temperature > 0 else "greedy"
        self.labels = {False: f"dali-audio/{search}", True: f"dali-audio+image/{search}"}

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        fail = Failures(batch)
        ok = fail.ok
        dim = self.model.clap.embedding_dim
        emb = np.zeros((n, dim), np.float32)
        captions, logprobs = [""] * n, np.full(n, np.nan, np.float32)
        with_frame = [False] * n
        if ok:
            uris, widx = batch.column("source_uri").to_pylist(), batch.column("window_index").to_pylist()
            pads = batch.column("pad_mode").to_pylist()
            frames = (batch.column("frame").to_pylist() if self.mode == "audio+image"
                      and "frame" in batch.column_names else [b""] * n)
            need = self.size * self.size * 3
            m = self.model.clap.window_samples
            x = np.stack([model_input(r, self.window_samples, m, pads[i])[0]  # window <= CLAP's 10 s
                          for r, i in zip(window_samples(batch.column("samples"), ok), ok)])
            fr = [np.frombuffer(frames[i], np.uint8).reshape(self.size, self.size, 3)
                  if len(frames[i] or b"") == need else None for i in ok]
            res = caption_windows(self.model, x, fr, [row_seed(uris[i], widx[i]) for i in ok],
                                  self.temperature, self.max_new_tokens)
            for i, r in zip(ok, res):
                if isinstance(r, Exception):
                    fail.mark(i, "model_error", "caption",
                              f"DALI captioner failed: {type(r).__name__}: {r}")
                else:
                    captions[i], logprobs[i], emb[i], with_frame[i] = r
        return add_columns(
            batch, drop=["samples", "frame"], **fail.columns(), audio_embedding=emb,
            caption=captions, logprob=pa.array(logprobs, pa.float32()),
            decoding=[self.labels[w] for w in with_frame], has_frame=with_frame,
            clap_id=[self.model.clap.model_id] * n, decoder_id=[self.model_id] * n,
            model_id=[self.model_id] * n)


__all__ = ["DaliCaptioner", "row_seed"]
