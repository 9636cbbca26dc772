"""Hugging Face Hub model references, offline: a hub cache populated in the hub's own layout
(models--org--name/{refs/main, snapshots/<sha>/...}) with the tiny models, HF_HUB_CACHE pointed at
it, HF_HUB_OFFLINE=1 (conftest). No test touches the network."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from overheard import hub, storage

SHA = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "89abcdef0123456789abcdef0123456789abcdef"


def populate(cache: str, repo: str, tree: dict[str, str], sha: str = SHA, ref: str = "main") -> str:
    """Copy local folders into cache/models--org--name/snapshots/<sha>/<dest> and point
    refs/<ref> at it (the layout huggingface_hub writes; blobs are optional for reading)."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", sha)
    for dest, src in tree.items():
        shutil.copytree(src, os.path.join(snap, dest) if dest else snap, dirs_exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", ref), "w") as f:
        f.write(sha)
    return snap


@pytest.fixture(scope="module")
def hub_cache(tiny_model, tmp_path_factory):
    """org/tiny-model (clap/ + decoder/, a model repo of ours) and laion-test/clap-tiny (an HF
    ClapModel directory at the repo root, like laion/clap-htsat-unfused), plus a second commit of
    org/tiny-model reachable only by its sha."""
    cache = str(tmp_path_factory.mktemp("hf-hub-cache"))
    populate(cache, "org/tiny-model", {"clap": os.path.join(tiny_model, "clap"),
                                       "decoder": os.path.join(tiny_model, "decoder")})
    populate(cache, "org/tiny-model", {"clap": os.path.join(tiny_model, "clap")}, sha=SHA2,
             ref="v0-clap-only")
    populate(cache, "laion-test/clap-tiny", {"": os.path.join(tiny_model, "clap")})
    return cache


def test_parse_and_local_paths_win(tmp_path, monkeypatch):
    assert hub.parse("laion/clap-htsat-unfused") == ("laion/clap-htsat-unfused", "", "")
    assert hub.parse("org/name@v1.2") == ("org/name", "v1.2", "")
    assert hub.parse("hf://org/name@abc/clap/") == ("org/name", "abc", "clap")
    assert hub.parse("hf://models/org/name") == ("org/name", "", "")
    for not_hub in ("./org/name", "/abs/org/name", "s3://bucket/model", "model", "a/b/c",
                    "org/na me", ""):
        assert hub.parse(not_hub) is None, not_hub
    # a local folder called org/name is a path, never a repo id
    monkeypatch.chdir(tmp_path)
    os.makedirs("org/name")
    assert hub.parse("org/name") is None and hub.model_ref("org/name") == "org/name"
    assert hub.model_ref("org/other@v2") == "hf://org/other@v2"


def test_warm_cache_offline_resolves_every_form(hub_cache, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache)
    snap = os.path.join(hub_cache, "models--org--tiny-model", "snapshots", SHA)
    assert hub.resolve("org/tiny-model") == snap
    assert hub.resolve(f"org/tiny-model@{SHA}") == snap
    assert hub.resolve("hf://org/tiny-model/clap") == os.path.join(snap, "clap")
    assert hub.resolve("hf://org/tiny-model@v0-clap-only/clap").endswith(f"{SHA2}/clap")
    assert hub.pin("org/tiny-model") == f"hf://org/tiny-model@{SHA}"
    assert hub.pin("hf://org/tiny-model@v0-clap-only/clap") == f"hf://org/tiny-model@{SHA2}/clap"
    # storage (used by every loader) understands hf:// URIs
    assert storage.exists("hf://org/tiny-model/decoder/config.json")
    assert not storage.exists("hf://org/tiny-model@v0-clap-only/decoder/config.json")
    assert storage.localize("hf://laion-test/clap-tiny") == os.path.join(
        hub_cache, "models--laion-test--clap-tiny", "snapshots", SHA)

    # a repo holding an HF ClapModel at its root loads and embeds exactly as the local copy
    from overheard.clap import ClapEncoder
    x = np.random.default_rng(0).standard_normal((2, 48000 * 10)).astype(np.float32) * 0.1
    a = ClapEncoder("hf://laion-test/clap-tiny").embed_audio(x)
    b = ClapEncoder(os.path.join(tiny_model, "clap")).embed_audio(x)
    np.testing.assert_array_equal(a, b)


def test_caption_model_paths_from_a_hub_id(hub_cache, monkeypatch):
    from jobs.caption import CaptionConfig, pin_models, resolve_model
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache)
    cfg = pin_models(CaptionConfig(input="in", output="out", model="org/tiny-model"))
    assert cfg.model == f"hf://org/tiny-model@{SHA}"
    clap, dec = resolve_model(cfg)
    assert (clap, dec) == (cfg.model + "/clap", cfg.model + "/decoder")
    # --clap as a LAION-style repo id overrides the model's clap/
    cfg = pin_models(CaptionConfig(input="in", output="out", model="org/tiny-model",
                                   clap="laion-test/clap-tiny"))
    assert resolve_model(cfg)[0] == f"hf://laion-test/clap-tiny@{SHA}"


def test_cold_cache_offline_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from jobs.caption import main
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    rc = main([str(tmp_path / "in"), str(out), "--model", "laion/clap-htsat-unfused@main"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "laion/clap-htsat-unfused@main" in err[0] and "HF_HUB_OFFLINE" in err[0]
    assert not out.exists()  # nothing was listed, written or started
    with pytest.raises(hub.HubNotCached, match="org/missing"):
        storage.localize("hf://org/missing/clap")
