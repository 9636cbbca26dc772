"""``overheard build-model OUT --clap ID_OR_PATH --corpus CAPTIONS...``: one command from a CLAP and
a caption corpus to a model directory the caption job loads with ``--model OUT``.

    overheard build-model ./my-model --clap laion/clap-htsat-unfused \\
        --corpus clotho_captions_development.csv audiocaps_train.csv \\
        --pairs clotho_dev_pairs.csv --references clotho_captions_evaluation.csv \\
        --eval-audio ./clotho/evaluation --use-gpu --num-workers 1

Steps (each reuses the command that does it alone; Ray underneath):
1. CLAP -> ``OUT/clap``: an HF ClapModel directory (local, s3://, or a Hugging Face repo id / hf://
   URI, overheard.hub) is copied byte for byte (same weights hash = same CLAP id, so embedding
   caches stay valid); an original LAION-CLAP ``.pt`` is converted to that layout once
   (overheard.clap: it needs tokenizer files beside the ``.pt`` for the text tower).
2. With ``--pairs`` (audio + caption rows, ``training.gap`` layouts): ``overheard estimate-gap``
   -> ``WORK/gap.json``: the noise variance sigma^2 and gap vector of THIS CLAP; the decoder is then
   trained with that sigma^2 (``--noise-variance -1``), else with ``--noise-variance`` (0.013, the
   seed's WavCaps estimate).
3. ``training.decoder`` (Ray Train ``TorchTrainer``): embeds the corpus with ``training.embed_captions``
   (Ray Data; cached under WORK), trains the text-only decoder -> ``OUT/decoder``.
4. With ``--references`` and ``--eval-audio``: the caption job on the evaluation audio with the new
   model (``--whole-clip``: one window per clip, CLAP-averaged) and ``overheard evaluate
   --windowing whole`` -> scores in the model card.
5. ``OUT/MODEL_CARD.md`` (corpus, CLAP, gap settings, training numbers, evaluation) and
   ``OUT/build.json`` (the same, machine-readable).
Work files (embedding cache, Ray Train runs/checkpoints, evaluation captions) go to ``WORK``
(default ``OUT-work``), not into the model directory; rerunning resumes training from them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import field

from jobs.config_cli import parse, to_json
from overheard import hub, storage
from training.common import TrainRun, caption_tokens_field, run_fields, train_config


# the decoder's run defaults: build-model hands its TrainRun on to training.decoder as it is
@train_config(run_name="decoder", epochs=10, batch_size=64, warmup_steps=100, num_workers=2)
class BuildModelConfig(TrainRun):
    output: str = field(metadata={"help": "model directory to write (local): clap/ decoder/ "
                                          "MODEL_CARD.md build.json"})
    clap: str = field(default="", metadata={
        "help": "CLAP: HF ClapModel dir, LAION-CLAP .pt (tokenizer files beside it), s3://, or a "
                "Hugging Face repo id (laion/clap-htsat-unfused, org/name@rev, hf://...)"})
    corpus: list[str] = field(default_factory=list, metadata={
        "help": "caption corpora (files / folders / prefixes; overheard.corpus layouts: Clotho "
                "caption_1..5 CSV, AudioCaps caption CSV, WavCaps JSON, text, Parquet)"})
    pairs: str = field(default="", metadata={
        "help": "audio-caption pairs (training.gap layouts) to estimate this CLAP's modality gap"})
    audio_root: str = field(default="", metadata={"help": "base for relative paths in --pairs"})
    max_pairs: int = field(default=0, metadata={
        "min": 0, "help": "gap: use at most this many pairs (0: all)"})
    references: str = field(default="", metadata={
        "help": "reference captions (Clotho / AudioCaps layout) for an evaluation; needs "
                "--eval-audio"})
    eval_audio: str = field(default="", metadata={"help": "the referenced clips (folder/glob)"})
    eval_whole_clip: float = field(default=30.0, metadata={
        "min": 0.0,
        "help": "evaluation: clips up to this long are one CLAP-averaged window (Clotho: 30)"})
    eval_metrics: str = field(default="default", metadata={"help": "overheard evaluate --metrics"})
    eval_tokenizer: str = field(default="ptb", metadata={
        "choices": ("ptb", "simple"), "help": "ptb (Java) | simple"})
    work: str = field(default="", metadata={
        "help": "work folder: embedding cache, training runs (unless --storage-path), evaluation "
                "(default OUT-work)"})
    gap_mode: str = field(default="noise", metadata={
        "choices": ("none", "noise", "shift", "both"), "help": "none | noise | shift | both"})
    noise_variance: float = field(default=0.013, metadata={
        "min": 0.0, "help": "sigma^2 when no --pairs are given (with --pairs: the estimate)"})
    n_layer: int = field(default=4, metadata={"min": 1, "help": "decoder transformer layers"})
    n_head: int = field(default=4, metadata={"min": 1, "help": "decoder attention heads"})
    n_embd: int = field(default=768, metadata={"min": 1, "help": "decoder width"})
    prefix_length: int = field(default=10, metadata={"min": 1, "help": "CLAP prefix tokens"})
    vocab_size: int = field(default=5000, metadata={
        "min": 16, "help": "BPE vocabulary trained on the corpus"})
    max_caption_tokens: int = caption_tokens_field(30)
    lr: float = field(default=2e-4, metadata={"gt": 0.0, "help": "peak learning rate"})
    actor_cpus: float = field(default=0.5, metadata={"gt": 0.0, "help": "CPUs per embedding/caption actor"})


def place_clap(src: str, dest: str) -> str:
    """CLAP ``src`` -> HF ClapModel directory ``dest``; returns how it got there."""
    from overheard.clap import _is_checkpoint_file, load_clap_model, save_clap_model

    local = storage.localize(src)
    if os.path.isdir(local):
        # copy, following the hub cache's symlinks into blobs/; the weights bytes are unchanged
        shutil.copytree(local, dest, symlinks=False, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".*"))
        return "copied"
    if not _is_checkpoint_file(local):
        raise FileNotFoundError(f"CLAP not found or not a directory/.pt checkpoint: {src}")
    model, fe, tok = load_clap_model(src)
    if tok is None:
        raise ValueError(f"{src}: no tokenizer files beside the .pt checkpoint (tokenizer.json, or "
                         f"vocab.json + merges.txt of roberta-base); the text tower needs them to "
                         f"embed the corpus")
    save_clap_model(model, fe, tok, dest)
    return "converted from a LAION-CLAP .pt checkpoint"


def _check(cfg: BuildModelConfig) -> None:
    if not cfg.clap or not cfg.corpus:
        raise ValueError("give --clap and --corpus")
    if bool(cfg.references) != bool(cfg.eval_audio):
        raise ValueError("--references and --eval-audio go together")
    if storage.protocol_of(cfg.output) != "file":
        raise ValueError("OUTPUT must be a local directory (copy it to object storage after)")
    if os.path.exists(os.path.join(cfg.output, "decoder")):
        raise FileExistsError(f"{cfg.output} already holds a model; choose a new OUTPUT")


def _clap_step(cfg: BuildModelConfig, clap_dir: str) -> dict:
    """Step 1: the CLAP into ``clap_dir``; returns its record."""
    from overheard.clap import ClapEncoder

    clap_src = hub.pin(hub.model_ref(cfg.clap))  # a cold hub cache offline fails here
    rec = {"source": cfg.clap, "resolved": clap_src, "how": place_clap(clap_src, clap_dir)}
    enc = ClapEncoder(clap_dir)
    rec.update(model_id=enc.model_id, embedding_dim=enc.embedding_dim,
               params=sum(p.numel() for p in enc.model.parameters()))
    return rec


def _gap_step(cfg: BuildModelConfig, clap_dir: str, work: str) -> tuple[str, float, dict | None]:
    """Step 2 (with --pairs): estimate-gap -> (gap file, the decoder's --noise-variance, record)."""
    from overheard.textonly.gap import load_gap
    from training import gap as train_gap

    if not cfg.pairs:
        return "", cfg.noise_variance, None
    gap_file = storage.join(work, "gap.json")
    argv = ["--clap", clap_dir, "--pairs", cfg.pairs, "--out", gap_file]
    if cfg.audio_root:
        argv += ["--audio-root", cfg.audio_root]
    if cfg.max_pairs:
        argv += ["--max-pairs", str(cfg.max_pairs)]
    train_gap.main(argv)
    g = load_gap(gap_file)
    rec = {"pairs": cfg.pairs, "n_pairs": g.get("n_pairs"),
           "noise_variance_estimate": g.get("noise_variance"), "gap_norm": g.get("gap_norm")}
    # -1: training.decoder takes sigma^2 from the gap file
    return gap_file, cfg.noise_variance if g.get("noise_variance") is None else -1.0, rec


def _decoder_step(cfg: BuildModelConfig, out: str, work: str, clap_dir: str, gap_file: str,
                  noise: float) -> dict:
    """Step 3: training.decoder with this command's run options -> OUT/decoder; returns the
    record's corpus, gap_settings and training entries."""
    from training import decoder as train_decoder

    run = dict(run_fields(cfg), storage_path=cfg.storage_path or storage.join(work, "runs"))
    s = train_decoder.run(train_decoder.TrainDecoderConfig(
        output=os.path.join(out, "decoder"), corpus=",".join(cfg.corpus), clap=clap_dir,
        cache=storage.join(work, "embeddings"), gap_mode=cfg.gap_mode, noise_variance=noise,
        gap_file=gap_file, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        prefix_length=cfg.prefix_length, vocab_size=cfg.vocab_size,
        max_caption_tokens=cfg.max_caption_tokens, lr=cfg.lr, actor_cpus=cfg.actor_cpus, **run))
    h = s["history"]
    with open(os.path.join(out, "decoder", "config.json")) as f:
        gap_used = json.load(f).get("extra", {}).get("modality_gap")
    return {"corpus": {"sources": list(cfg.corpus), "captions": s["captions"],
                       "vocab_size": s["vocab_size"]},
            "gap_settings": gap_used,
            "training": {
                "decoder_params": s["params"], "epochs": cfg.epochs, "steps": h[-1]["step"] if h else 0,
                "loss_first_epoch": h[0]["loss"] if h else None,
                "loss_last_epoch": h[-1]["loss"] if h else None,
                "tokens_per_s_last_epoch": h[-1]["tokens_per_s"] if h else None,
                "workers": cfg.num_workers, "gpu": cfg.use_gpu, "seconds": s["seconds"]}}


def _evaluation_step(cfg: BuildModelConfig, out: str, work: str) -> dict:
    """Step 4: the caption job on --eval-audio with the new model, scored on whole clips."""
    from jobs import caption, evaluate

    ccfg = caption.CaptionConfig(
        input=cfg.eval_audio, output=storage.join(work, "evaluation"), model=out,
        whole_clip=cfg.eval_whole_clip, actor_cpus=cfg.actor_cpus, show=0, progress=False,
        ray_address=cfg.ray_address)
    m = caption.run(ccfg)
    rep = evaluate.evaluate(ccfg.output, cfg.references, cfg.eval_metrics,
                            cfg.eval_tokenizer, windowing="whole")
    return {"references": cfg.references, "audio": cfg.eval_audio,
            "windowing": rep["windowing"], "whole_clip_s": cfg.eval_whole_clip,
            "metrics": rep["metrics"], "tokenizer": rep["tokenizer"],
            "n_scored": rep["n_scored"], "caption_run": m["run_id"], "captions": ccfg.output}


def run(cfg: BuildModelConfig) -> dict:
    """Build the model directory; returns the build record (also OUT/build.json)."""
    t0 = time.time()
    _check(cfg)
    out = os.path.abspath(cfg.output)
    work = cfg.work or out.rstrip("/") + "-work"
    clap_dir = os.path.join(out, "clap")
    rec: dict = {"config": json.loads(to_json(cfg)), "clap": _clap_step(cfg, clap_dir)}
    t_clap = time.time()
    gap_file, noise, gap = _gap_step(cfg, clap_dir, work)
    if gap is not None:
        rec["gap"] = gap
    t_gap = time.time()
    rec.update(_decoder_step(cfg, out, work, clap_dir, gap_file, noise))
    t_train = time.time()
    if cfg.references:
        rec["evaluation"] = _evaluation_step(cfg, out, work)
    rec["seconds"] = {"clap": round(t_clap - t0, 1), "gap": round(t_gap - t_clap, 1),
                      "decoder": round(t_train - t_gap, 1),
                      "evaluation": round(time.time() - t_train, 1),
                      "total": round(time.time() - t0, 1)}
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(rec, f, indent=1, default=str)
    with open(os.path.join(out, "MODEL_CARD.md"), "w") as f:
        f.write(model_card(rec))
    rec["output"] = out
    return rec


def _fmt(v, spec=".4f") -> str:
    return "n/a" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def model_card(rec: dict) -> str:
    """MODEL_CARD.md text from the build record."""
    c, t, g = rec["clap"], rec["training"], rec.get("gap_settings") or {}
    lines = [
        "# Caption model built by `overheard build-model`", "",
        "Load with `overheard caption INPUT OUTPUT --model <this directory>`.", "",
        "## CLAP (`clap/`)", "",
        f"- source: `{c['source']}` (resolved `{c['resolved']}`), {c['how']}",
        f"- id `{c['model_id']}`, embedding dim {c['embedding_dim']}, {c['params']:,} parameters",
        "", "## Caption corpus", "",
        *[f"- `{s}`" for s in rec["corpus"]["sources"]],
        f"- {rec['corpus']['captions']:,} captions; BPE vocabulary {rec['corpus']['vocab_size']:,}",
        "", "## Modality gap", "",
        f"- mode `{g.get('mode')}`, noise variance sigma^2 = {_fmt(g.get('noise_variance'), '.5f')}, "
        f"renormalise {g.get('renormalise')}, gap vector norm {_fmt(g.get('gap_norm'))}",
    ]
    if rec.get("gap"):
        x = rec["gap"]
        lines.append(f"- estimated from {x['n_pairs']} audio-caption pairs of `{x['pairs']}`: "
                     f"sigma^2 = {_fmt(x['noise_variance_estimate'], '.5f')}, "
                     f"|mean(a) - mean(t)| = {_fmt(x['gap_norm'])}")
    else:
        lines.append("- no audio-caption pairs given: sigma^2 is the configured value")
    lines += [
        "", "## Decoder training (`decoder/`)", "",
        f"- {t['decoder_params']:,} parameters, {t['epochs']} epochs = {t['steps']} steps on "
        f"{t['workers']} {'GPU' if t['gpu'] else 'CPU'} worker(s)",
        f"- loss {_fmt(t['loss_first_epoch'])} (first epoch) -> {_fmt(t['loss_last_epoch'])} "
        f"(last); {_fmt(t['tokens_per_s_last_epoch'], '.0f')} tokens/s in the last epoch",
        f"- seconds: {t['seconds']}",
    ]
    if rec.get("evaluation"):
        e = rec["evaluation"]
        lines += ["", "## Evaluation", "",
                  f"{e['n_scored']} clips of `{e['audio']}` against `{e['references']}`, scored on "
                  f"whole clips (one window up to {e['whole_clip_s']:g} s, CLAP-averaged); "
                  f"tokenizer {e['tokenizer']}", "", "| metric | score |", "|---|---:|",
                  *[f"| {k} | {v:.4f} |" for k, v in e["metrics"].items()]]
    else:
        lines += ["", "## Evaluation", "", "none (no --references given)"]
    lines += ["", f"Build time: {rec['seconds']} s (`build.json` has every number).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(BuildModelConfig, argv, "overheard build-model",
                "CLAP + caption corpus -> model directory (clap/ + decoder/ + MODEL_CARD.md).")
    try:
        rec = run(cfg)
    except hub.HubNotCached as e:
        print(f"overheard build-model: error: {e}", file=sys.stderr)
        return 2
    t = rec["training"]
    print(f"model: {rec['output']}  (decoder {t['decoder_params']:,} parameters, loss "
          f"{_fmt(t['loss_last_epoch'])}, {rec['corpus']['captions']} captions)")
    if rec.get("evaluation"):
        print("evaluation (whole clips): " + ", ".join(
            f"{k} {v:.4f}" for k, v in rec["evaluation"]["metrics"].items()))
    print(f"card: {os.path.join(rec['output'], 'MODEL_CARD.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
