"""The sound world's reference captions: five per scene from templates with synonyms and
temporal relations (single source, sequence, a source over a background, both)."""

from __future__ import annotations

from overheard.soundworld.sources import N_CAPTIONS, SOURCES

COUNT_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times"}


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


def scene_captions(rng, meta: dict) -> list[str]:
    """Five distinct captions of a scene (``meta`` of ``make_scene``), drawn with ``rng``."""
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
