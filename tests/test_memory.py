"""Memory strategies (nearest neighbour, projection, top-k, shift) against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from overheard.textonly import condition_audio
from overheard.textonly.gap import condition, gap_vector, shift
from overheard.textonly.memory import (DEFAULT_TEMPERATURE, CaptionMemory, nearest_indices, nearest_neighbour,
                                       projection, top_k)

S = math.sqrt(0.5)


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_nearest_neighbour_picks_most_similar():
    memory = unit([1, 0], [0, 1], [1, 1])
    audio = unit([0.9, 0.1], [0.1, 0.9], [0.6, 0.55], [-1, 0.2])
    # cosines row 0: .994, .110, .778 -> 0;  row 1 -> 1;  row 2: .737, .675, .999 -> 2;
    # row 3: -.981, .196, -.555 -> 1
    idx, score = nearest_indices(audio, memory)
    assert idx.tolist() == [0, 1, 2, 1]
    assert score[0].item() == pytest.approx(0.9 / math.hypot(0.9, 0.1), abs=1e-6)
    out = nearest_neighbour(audio, memory)
    assert torch.equal(out, memory[[0, 1, 2, 1]])


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_nearest_neighbour_ties_take_lowest_index(chunk):
    memory = unit([0, 1], [1, 0], [1, 0], [0, 1])
    audio = unit([1, 0], [0, 1], [1, 1])
    # [1,1] ties with all four (cos = .7071) -> index 0; [1,0] ties rows 1 and 2 -> 1
    idx, _ = nearest_indices(audio, memory, chunk_size=chunk)
    assert idx.tolist() == [1, 0, 0]


def test_projection_equals_hand_computed_softmax_mix():
    memory = unit([1, 0], [0, 1])
    audio = unit([1, 0])
    # T = 0.5: logits (1/.5, 0/.5) = (2, 0); w = (e^2, 1)/(e^2 + 1) = (0.880797, 0.119203);
    # mix = (0.880797, 0.119203), |mix| = 0.888826 -> (0.990966, 0.134113)
    out = projection(audio, memory, temperature=0.5)
    assert out[0].tolist() == pytest.approx([0.9909661, 0.1341127], abs=1e-6)


def test_projection_3d_against_pure_python():
    memory = unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1])
    audio = unit([0.8, 0.3, 0.1], [0.1, 0.2, 0.9])
    t = 0.1
    out = projection(audio, memory, temperature=t, chunk_size=3)
    for b in range(2):
        a = audio[b].tolist()
        sims = [sum(x * y for x, y in zip(a, m)) for m in memory.tolist()]
        e = [math.exp(s / t) for s in sims]
        w = [x / sum(e) for x in e]
        mix = [sum(w[i] * memory[i, d].item() for i in range(4)) for d in range(3)]
        n = math.sqrt(sum(x * x for x in mix))
        assert out[b].tolist() == pytest.approx([x / n for x in mix], abs=1e-6)


def test_projection_default_temperature_is_seed_value_and_sharpens_to_nn():
    assert DEFAULT_TEMPERATURE == 0.01  # seed: softmax(100 * cosine)
    memory = unit([1, 0], [0, 1], [1, 1])
    audio = unit([0.9, 0.1])
    # cosines .994 / .110 / .778: at T = 0.01 the weight of row 0 is 1 - ~4e-10 -> ~ row 0
    assert torch.allclose(projection(audio, memory), memory[:1], atol=1e-6)
    # large temperature -> close to the normalised mean of the memory
    far = projection(audio, memory, temperature=1e4)
    assert torch.allclose(far, F.normalize(memory.mean(0, keepdim=True), dim=-1), atol=1e-3)


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(300, 16, generator=g), dim=-1)
    audio = F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    ref_p = projection(audio, memory, 0.05, chunk_size=300)
    full_w = torch.softmax(audio @ memory.T / 0.05, dim=1)
    assert torch.allclose(ref_p, F.normalize(full_w @ memory, dim=-1), atol=1e-6)
    ref_i, ref_s = top_k(audio, memory, 5, chunk_size=300)
    for chunk in (1, 7, 64, 299):
        assert torch.allclose(projection(audio, memory, 0.05, chunk_size=chunk), ref_p, atol=1e-6)
        assert torch.equal(nearest_indices(audio, memory, chunk)[0], ref_i[:, 0])
        i, s = top_k(audio, memory, 5, chunk_size=chunk)
        assert torch.equal(i, ref_i) and torch.allclose(s, ref_s)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1000])
def test_top_k_against_brute_force_with_many_ties(chunk):
    # small integer vectors: dot products are exact, so ties are real ties
    g = torch.Generator().manual_seed(1)
    memory = torch.randint(-1, 2, (40, 3), generator=g).float()
    audio = torch.randint(-1, 2, (6, 3), generator=g).float()
    sims = audio @ memory.T
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :7]  # ties: lowest index
    i, s = top_k(audio, memory, 7, chunk_size=chunk)
    assert torch.equal(i, order)
    assert torch.equal(s, sims.gather(1, order))


def test_top_k_hand_example_and_k_capped():
    memory = unit([1, 0], [0, 1], [1, 1], [1, 0])
    audio = unit([1, 0])
    i, s = top_k(audio, memory, 3, chunk_size=2)
    assert i.tolist() == [[0, 3, 2]]
    assert s[0].tolist() == pytest.approx([1, 1, S], abs=1e-6)
    i, _ = top_k(audio, memory, 10)
    assert i.shape == (1, 4)


def test_shift_renormalises_like_the_seed():
    e = unit([1, 0])
    assert shift(e, [0.0, 1.0])[0].tolist() == pytest.approx([S, S], abs=1e-7)
    assert shift(e, torch.tensor([0.0, 1.0]), renormalise=False)[0].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="gap vector"):
        shift(e, [1.0, 2.0, 3.0])


def test_gap_vector_is_difference_of_means():
    audio = unit([1, 0], [0, 1])
    text = unit([1, 0], [1, 0])
    assert gap_vector(audio, text).tolist() == pytest.approx([-0.5, 0.5])


def test_condition_shifts_then_adds_seeded_noise():
    t = torch.tensor([[2.0, 0.0]])                       # normalised to (1, 0) first
    assert condition(t, "none", 0.5)[0].tolist() == [1.0, 0.0]
    assert condition(t, "shift", 0.0, [0.0, 1.0])[0].tolist() == pytest.approx([S, S], abs=1e-7)
    # noise: z + sqrt(0.25) * N(0, I) drawn from the generator, then re-normalised
    n = torch.randn((1, 2), generator=torch.Generator().manual_seed(3))
    want = F.normalize(torch.tensor([[S, S]]) + 0.5 * n, dim=-1)
    got = condition(t, "both", 0.25, [0.0, 1.0], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want)
    raw = condition(t, "noise", 0.25, renormalise=False, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(raw, torch.tensor([[1.0, 0.0]]) + 0.5 * n)
    with pytest.raises(ValueError, match="unknown gap mode"):
        condition(t, "jitter", 0.1)


def test_condition_audio_strategies():
    memory = unit([1, 0], [0, 1], [1, 1])
    audio = unit([1, 0.2])
    assert torch.equal(condition_audio(audio, "plain"), audio)
    assert condition_audio(audio, "nearest", memory)[0].tolist() == memory[0].tolist()
    torch.testing.assert_close(condition_audio(audio, "projection", memory, temperature=0.05),
                               projection(audio, memory, 0.05))
    packed = condition_audio(audio, "retrieval", memory, k=2)
    assert packed.shape == (1, 3, 2) and torch.equal(packed[0, 1:], memory[[0, 2]])
    with pytest.raises(ValueError, match="needs a caption memory"):
        condition_audio(audio, "nearest")


def test_shape_errors():
    with pytest.raises(ValueError, match="expected audio"):
        projection(torch.zeros(2, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbour(torch.zeros(1, 2), torch.zeros(0, 2))


def test_from_texts_keeps_the_last_partial_batch():
    captions = [f"caption number {i}" for i in range(2501)]
    sizes = []

    def encode(batch):
        sizes.append(len(batch))
        # deterministic fake text encoder: (index, 1, 0) -> normalised
        idx = torch.tensor([float(c.rsplit(" ", 1)[1]) for c in batch])
        return torch.stack([idx, torch.ones_like(idx), torch.zeros_like(idx)], dim=1)

    mem = CaptionMemory.from_texts(captions, encode, batch_size=1000)
    assert sizes == [1000, 1000, 501]
    assert len(mem) == 2501 and mem.embeddings.shape == (2501, 3)
    assert mem.captions == captions
    assert torch.allclose(mem.embeddings.norm(dim=-1), torch.ones(2501))
    assert mem.embeddings[2500].tolist() == pytest.approx(F.normalize(torch.tensor([2500.0, 1, 0]), dim=0).tolist())


def test_save_load_round_trip(tmp_path):
    captions = ["a dog barks", 'a "quoted" word', "line\nbreak", "café ambience — ünïcode"]
    emb = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    mem = CaptionMemory(emb, captions)
    mem.save(tmp_path / "m")
    lines = (tmp_path / "m" / "memory_captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == captions  # one JSON string per line
    back = CaptionMemory.load(tmp_path / "m")
    assert back.captions == captions and torch.equal(back.embeddings, emb)
    assert back.retrieve(emb[2:3], 2)[0][0] == ("line\nbreak", pytest.approx(1.0, abs=1e-6))
    assert torch.equal(back.nearest_neighbour(emb[[3, 1]]), emb[[3, 1]])


def test_load_rejects_inconsistent_directories(tmp_path):
    mem = CaptionMemory(unit([1, 0], [0, 1]), ["a", "b"])
    d = mem.save(tmp_path / "m")
    (d / "memory_captions.jsonl").write_text('"a"\n')
    with pytest.raises(ValueError, match="2 embeddings but 1 captions"):
        CaptionMemory.load(d)
    (d / "memory_captions.jsonl").unlink()
    with pytest.raises(ValueError, match="missing memory_captions.jsonl"):
        CaptionMemory.load(d)
