"""DALI (Distribution ALIgnment): caption audio, or audio plus frames, with a frozen
vision-language captioner (LLaVA-class) whose vision tokens an audio encoder learned to imitate.

Modules: ``losses`` (MMD, exact OT, attentive OT), ``llava`` (loading, prompt assembly, batched
generation), ``model`` (the captioner: CLAP audio tower tokens + projection into the vision-token
space as ``DaliModel.audio_tokens``, checkpoint save/load), ``tiny`` (tiny random models in the
real formats; ``build_tiny_dali`` writes the whole clap/ llava/ dali/ layout), ``captioning``
(``caption_windows``: the one way windows are captioned).
No Ray here: training scripts live in ``training/dali_*.py``, the actor in
``actors/dali_captioner.py``; both caption through ``captioning``.
"""
