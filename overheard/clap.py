"""CLAP encoder: LAION-CLAP audio/text towers (transformers' ClapModel) behind a small numpy API.

No Ray, no object-storage logic beyond ``storage.localize``. A model path is either
- an HF-format ClapModel directory (config.json + model.safetensors, or pytorch_model.bin which transformers
  loads with weights_only; preprocessor_config.json; tokenizer files), as published under laion/clap-htsat-*
  or written by ``save_clap_model``; local or any fsspec URL (s3://...), or
- an original laion-clap ``.pt`` checkpoint (converted on load by ``overheard.clap_convert``). Such files
  carry no tokenizer: ``embed_text`` needs tokenizer files (tokenizer.json, or vocab.json + merges.txt)
  in the same directory as the ``.pt``.

Audio front end: the log-mel spectrogram that ClapFeatureExtractor computes in float64 numpy is
re-implemented (``LogMel``: torch.stft on a GPU, scipy's float32 FFT row by row on the CPU), with the
extractor's own filterbank. Single-thread CPU time per 10-s window: transformers' extractor ~55 ms,
torch.stft ~17 ms at batch 16, ``LogMel`` on the CPU ~7 ms (bench/logmel.py); mel values agree to 2e-5 dB, embeddings to <7e-6 (HTSAT-tiny/base); against
laion-clap's own code: <7.4e-6 with ``LogMel``, <2.9e-6 with the extractor (tests/test_clap.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

from overheard import storage
from overheard.checkpoint import model_id

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class LogMel(torch.nn.Module):
    """Torch twin of ClapFeatureExtractor's mel for inputs exactly ``nb_max_samples`` long.

    Input (B, T) float waveforms; output (B, 1, frames, n_mels) float32 dB = 10*log10(max(mel power, 1e-10)),
    frames = T // hop + 1 (centre-padded, reflect), i.e. (B, 1, 1001, 64) for 10 s at 48 kHz, hop 480.
    ``slaney=True``: librosa-style slaney filters (non-fusion models, laion-clap's torchlibrosa front end);
    ``slaney=False``: HTK filters without normalisation (fusion models, laion-clap's torchaudio front end).
    """

    def __init__(self, fe: ClapFeatureExtractor, slaney: bool = True):
        super().__init__()
        self.n_fft = int(fe.fft_window_size)
        self.hop = int(fe.hop_length)
        filters = fe.mel_filters_slaney if slaney else fe.mel_filters  # (n_fft/2+1, n_mels) float64
        self.register_buffer("filters", torch.from_numpy(np.asarray(filters, dtype=np.float32)), persistent=False)
        # periodic Hann, as transformers' window_function(n, "hann") and librosa's get_window("hann")
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mel = self._cpu_mel(x) if x.device.type == "cpu" else self._stft_mel(x)
        return (10.0 * torch.log10(torch.clamp(mel, min=1e-10))).unsqueeze(1)

    def _stft_mel(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) -> power mel (B, frames, n_mels), batched torch.stft (the GPU path)."""
        spec = torch.stft(x.float(), self.n_fft, hop_length=self.hop, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)  # (B, F, frames)
        power = spec.real.square() + spec.imag.square()
        return torch.matmul(power.transpose(1, 2), self.filters)

    def _cpu_mel(self, x: torch.Tensor) -> torch.Tensor:
        """The same power mel on the CPU, one row at a time: reflect-pad, frame (a strided view),
        window, scipy's float32 rfft. Why: on one core torch.stft costs ~11 ms per 10-s window
        (+1.4 ms for |X|^2, ~17 ms per window at batch 16 where the (16, 513, 1001) complex
        spectrum falls out of cache); this path ~7 ms, identical to 7e-7 relative (bench/logmel.py,
        tests/test_clap.py). No gradient flows through a mel (its input is audio)."""
        import scipy.fft

        xs = x.detach().float().numpy()
        win = self.window.numpy()
        pad = self.n_fft // 2
        out = torch.empty((xs.shape[0], xs.shape[1] // self.hop + 1, self.filters.shape[1]))
        for i, row in enumerate(xs):
            frames = np.lib.stride_tricks.sliding_window_view(
                np.pad(row, (pad, pad), mode="reflect"), self.n_fft)[:: self.hop] * win
            spec = scipy.fft.rfft(frames, axis=-1, workers=1)  # complex64 (frames, n_fft/2+1)
            # the filterbank product in torch, not numpy: numpy's OpenBLAS ignores
            # torch.set_num_threads and spins a thread per core next to the other actors
            torch.matmul(torch.from_numpy(spec.real ** 2 + spec.imag ** 2), self.filters, out=out[i])
        return out


def _is_checkpoint_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".pt", ".pth", ".ckpt", ".bin"))


def _default_feature_extractor(config: ClapConfig) -> ClapFeatureExtractor:
    """The front end every published LAION-CLAP uses: 48 kHz, 10 s, n_fft 1024, hop 480, 64 mels 50..14000 Hz."""
    fusion = bool(config.audio_config.enable_fusion)
    return ClapFeatureExtractor(
        feature_size=config.audio_config.num_mel_bins, sampling_rate=48000, hop_length=480, max_length_s=10,
        fft_window_size=1024, frequency_min=50, frequency_max=14000,
        truncation="fusion" if fusion else "rand_trunc", padding="repeatpad",
    )


def _load_tokenizer_from(directory: str):
    """Tokenizer files of a directory -> tokenizer, or None if there are none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, RobertaTokenizer

    if os.path.exists(os.path.join(directory, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception:
            pass
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"),
                                       bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                       mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=77)
    if os.path.exists(os.path.join(directory, "vocab.json")) and os.path.exists(os.path.join(directory, "merges.txt")):
        return RobertaTokenizer(vocab_file=os.path.join(directory, "vocab.json"),
                                merges_file=os.path.join(directory, "merges.txt"), model_max_length=77)
    return None


def check_clap_dir(local: str) -> None:
    """Refuse an HF ClapModel directory whose weights do not fit its config, before anything is
    allocated: config.json size fields bounded (checkpoint.check_config_sizes), the model built
    on the meta device (no memory), its state dict compared with the safetensors headers
    (every tensor present and shaped right; extra tensors refused, except buffers the model
    recomputes such as position_ids). ``from_pretrained`` alone random-initialises a missing
    tensor with a warning: embeddings unrelated to the audio, captions wrong, exit 0."""
    import json

    from overheard.checkpoint import check_config_sizes, check_tensors, safetensors_shapes

    cfg_path = os.path.join(local, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_path}: cannot read config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    check_config_sizes(raw, cfg_path)
    config = ClapConfig.from_dict(raw)
    with torch.device("meta"):
        model = ClapModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {n for n, _ in model.named_buffers()}
    index = os.path.join(local, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(local, "model.safetensors")):
        found = safetensors_shapes([os.path.join(local, "model.safetensors")])
    elif os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set((json.load(f).get("weight_map") or {}).values()))
        if any(os.path.basename(s) != s for s in shards):
            raise ValueError(f"{index}: shard names must be plain file names")
        found = safetensors_shapes([os.path.join(local, s) for s in shards])
    elif os.path.isfile(os.path.join(local, "pytorch_model.bin")):
        sd = torch.load(os.path.join(local, "pytorch_model.bin"), map_location="cpu",
                        weights_only=True, mmap=True)
        found = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
        del sd
    else:
        raise ValueError(f"{local}: no model.safetensors (or pytorch_model.bin)")
    check_tensors(expected, found, local, ignorable=buffers)


def load_clap_model(path: str):
    """Load a CLAP model once: ``path`` (local, s3://, any fsspec URL) -> (ClapModel in eval mode,
    ClapFeatureExtractor, tokenizer or None). See the module docstring for accepted layouts."""
    from transformers.utils import logging as hf_logging

    local = storage.localize(path)
    # no "Loading weights" progress bar per load (one per actor and one in the driver, on every
    # run); loading a CLAP takes well under a second to a few seconds
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_clap_model(path, local)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _load_clap_model(path: str, local: str):
    if _is_checkpoint_file(local):
        from overheard.clap_convert import convert_laion_checkpoint

        config, sd = convert_laion_checkpoint(local)
        with torch.device("meta"):  # no random init of ~150 M parameters that are overwritten anyway
            model = ClapModel(config)
        model.load_state_dict(sd, strict=True, assign=True)
        fe = _default_feature_extractor(config)
        tok = _load_tokenizer_from(os.path.dirname(local))
    elif os.path.isdir(local):
        check_clap_dir(local)  # before from_pretrained, which random-initialises missing tensors
        # weights_only: a pytorch_model.bin is never fully unpickled (safetensors needs no such guard)
        model = ClapModel.from_pretrained(local, local_files_only=True, weights_only=True)
        if os.path.exists(os.path.join(local, "preprocessor_config.json")):
            fe = ClapFeatureExtractor.from_pretrained(local, local_files_only=True)
        else:
            fe = _default_feature_extractor(model.config)
        tok = _load_tokenizer_from(local)
    else:
        raise FileNotFoundError(f"CLAP model not found or not a directory/.pt checkpoint: {path!r}")
    return model.eval(), fe, tok


def save_clap_model(model: ClapModel, feature_extractor: ClapFeatureExtractor, tokenizer, directory: str) -> None:
    """Write an HF-format model directory: config.json + model.safetensors + preprocessor_config.json +
    tokenizer files (if a tokenizer is given). Loadable by ``load_clap_model`` and ``ClapModel.from_pretrained``."""
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    feature_extractor.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def clap_model_id(path: str, local: str | None = None) -> str:
    """The id ``ClapEncoder(path).model_id`` reports, without loading the model: basename of the
    model URI + first 12 hex of sha256 over its weight file(s) (``checkpoint.model_id``).
    ``local``: the already localised copy of ``path`` (default: ``storage.localize(path)``)."""
    local = storage.localize(path) if local is None else local
    files = [local] if os.path.isfile(local) else [
        os.path.join(local, f) for f in sorted(os.listdir(local))
        if f in WEIGHT_FILES or (f.startswith("model-") and f.endswith(".safetensors"))]
    return model_id(path, files, "clap")


class ClapEncoder:
    """Embed fixed-length audio windows and texts into CLAP's joint space.

    ``path``: see ``load_clap_model``. ``device``/``dtype``: where and in which precision the towers run
    (the mel is always computed in float32, then cast). ``mel``: "torch" (default, ``LogMel``) or "hf"
    (transformers' ClapFeatureExtractor, slower; kept as the reference).
    Attributes: sampling_rate (48000), window_samples (max_length_s * sampling_rate = 480000),
    embedding_dim (projection dim, 512 for real CLAP), model_id, fusion, max_batch.
    """

    def __init__(self, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, mel: str = "torch",
                 max_batch: int = 32):
        self.path = path
        self.device = torch.device(device)
        self.dtype = dtype
        model, fe, tok = load_clap_model(path)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.feature_extractor = fe
        self.tokenizer = tok
        self.sampling_rate = int(fe.sampling_rate)
        self.window_samples = int(fe.nb_max_samples)
        self.embedding_dim = int(self.model.config.projection_dim)
        self.fusion = bool(self.model.config.audio_config.enable_fusion)
        if mel not in ("torch", "hf"):
            raise ValueError(f"mel must be 'torch' or 'hf', got {mel!r}")
        self.mel = mel
        self.logmel = LogMel(fe, slaney=not self.fusion).to(self.device)
        # chunk big batches: HTSAT-base activations are ~60 MB per window in float32
        self.max_batch = max_batch
        self.model_id = clap_model_id(path)

    # -- audio ---------------------------------------------------------------------------------------
    def _features(self, windows) -> torch.Tensor:
        """(B, window_samples) numpy array or tensor -> model input features in ``dtype``."""
        if self.mel == "torch":
            feats = self.logmel(torch.as_tensor(windows, device=self.device))
        else:
            # exactly window_samples long: no random crop (rand_trunc) and no padding happen.
            # For fusion models we force the non-longer branch below; the extractor's 4-copy stack is built
            # from the same HTK mel as LogMel(slaney=False).
            windows = windows.detach().cpu().numpy() if torch.is_tensor(windows) else windows
            out = self.feature_extractor(list(windows.astype(np.float64)), sampling_rate=self.sampling_rate,
                                         truncation="fusion" if self.fusion else "rand_trunc",
                                         padding="repeatpad", return_tensors="pt")
            feats = out["input_features"][:, :1].float().to(self.device)
        if self.fusion:
            # a clip no longer than the window: laion-clap (eval) and transformers use 4 identical mel copies
            # and only the global channel; is_longer all False keeps it deterministic.
            feats = feats.expand(-1, 4, -1, -1)
        return feats.to(self.dtype)

    def embed_audio(self, windows: np.ndarray) -> np.ndarray:
        """windows: float32 (B, window_samples) mono at sampling_rate, already cut/padded by the caller.
        Returns float32 (B, embedding_dim), L2-normalised. Deterministic (no random crop)."""
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim == 1:
            windows = windows[None]
        if windows.ndim != 2 or windows.shape[1] != self.window_samples:
            raise ValueError(f"expected (B, {self.window_samples}) windows, got {windows.shape}")
        if windows.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        outs = []
        with torch.inference_mode():
            for i in range(0, windows.shape[0], self.max_batch):
                chunk = np.ascontiguousarray(windows[i:i + self.max_batch])
                if not chunk.flags.writeable:  # Arrow-backed batches are read-only; torch warns on those
                    chunk = chunk.copy()
                feats = self._features(chunk)
                kwargs = {}
                if self.fusion:
                    kwargs["is_longer"] = torch.zeros((feats.shape[0], 1), dtype=torch.bool, device=self.device)
                emb = self.model.get_audio_features(input_features=feats, **kwargs).pooler_output
                outs.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(outs).astype(np.float32, copy=False)

    def audio_tokens(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows: float32 (B, window_samples) tensor on ``device`` -> (tokens (B, N, C): the audio
        tower's last-layer token grid, frequency-major (HTSAT: 2 x 32 = 64 tokens of width 768 for
        HTSAT-tiny, 1024 for base), embeddings (B, embedding_dim) L2-normalised). One tower pass
        gives both. Runs under the caller's grad mode (DALI may fine-tune the tower)."""
        feats = self._features(windows)
        kwargs = {}
        if self.fusion:
            kwargs["is_longer"] = torch.zeros((feats.shape[0], 1), dtype=torch.bool, device=self.device)
        out = self.model.audio_model(input_features=feats, **kwargs)
        grid = out.last_hidden_state  # (B, C, F', T')
        tokens = grid.flatten(2).transpose(1, 2)
        emb = torch.nn.functional.normalize(self.model.audio_projection(out.pooler_output).float(), dim=-1)
        return tokens, emb

    @property
    def audio_token_dim(self) -> int:
        return int(self.model.config.audio_config.hidden_size)

    # -- text ----------------------------------------------------------------------------------------
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """texts -> float32 (B, embedding_dim), L2-normalised. Padded to the longest in each chunk of
        max_batch, truncated to 77 tokens (CLAP's context length)."""
        if self.tokenizer is None:
            raise RuntimeError(
                f"{self.path!r} has no tokenizer: put tokenizer.json (or RoBERTa vocab.json + merges.txt) "
                "next to the checkpoint; original laion-clap .pt files do not include one")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embedding_dim), np.float32)
        outs = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.max_batch):
                enc = self.tokenizer(texts[i:i + self.max_batch], padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
                emb = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                   attention_mask=enc["attention_mask"].to(self.device)).pooler_output
                outs.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(outs).astype(np.float32, copy=False)


__all__ = ["ClapEncoder", "LogMel", "load_clap_model", "save_clap_model"]
