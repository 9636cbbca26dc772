"""Token-distribution alignment losses for DALI ("An Eye for an Ear", section 3.2, appendices E, F).

DALI teaches an audio encoder to produce tokens that a frozen image captioner (LLaVA) can read
in place of its CLIP image tokens. LLaVA consumes the whole set of image tokens, not a pooled
vector, so the audio tokens of a clip must match the *distribution* of the image tokens of a
frame from the same video. Contrastive training on pooled vectors only matches mean statistics
and leaves a "modality gap" (each modality in its own sub-region of the space), which confuses
the language model when the encoders are swapped. The paper compares three losses, all of which
need no negative samples:

* ``mmd_rbf``: squared Maximum Mean Discrepancy with a mixture of Gaussian kernels. It compares
  the kernel mean embeddings of the two token sets. Appendix E uses kernels spanning several
  ranges: the bandwidth is the mean pairwise squared distance times ``kernel_mul ** k``.
* ``emd``: exact optimal transport with a squared-Euclidean cost (the paper's "EMD"). It uses
  the geometry of the token space and moves every audio token onto image tokens. The paper
  computes it with POT (Python Optimal Transport), and so do we.
* ``attentive_ot``: exact OT whose marginals are not uniform but learned by cross-attention
  between the two token sets (``AttentiveWeights``, appendix F). Sounding objects may be hidden
  in the frame and visible objects may be silent, so some tokens have no counterpart in the other
  modality; plain OT must still move all of their mass. With learned weights such tokens get
  little mass. An entropy regulariser keeps the weights from collapsing onto the one closest
  pair (a trivial zero-cost solution). The attention layers are used only during training.

Shapes: token sets are ``(N, D)``, or ``(B, N, D)`` for a batch of B independent pairs, in which
case every loss is computed per pair and averaged over the batch.
"""

from __future__ import annotations


import torch
from torch import nn

__all__ = [
    "ALIGNMENT_LOSSES",
    "AttentiveWeights",
    "alignment_loss",
    "attentive_ot",
    "emd",
    "entropy",
    "lambda_schedule",
    "mmd_rbf",
]

ALIGNMENT_LOSSES = ("mmd", "emd", "attentive_ot")

# POT's default (100_000) network-simplex iterations can stop early on 576 x 64 problems
# (576 = CLIP ViT-L/14@336px patch tokens); when that happens POT only warns and returns a
# suboptimal cost. 1e6 is enough for that size and costs nothing when fewer are needed.
EMD_MAX_ITER = 1_000_000


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(..., N, D), (..., M, D) -> (..., N, M)``.

    Uses ||x||^2 + ||y||^2 - 2 x.y: O(N M) memory instead of the O(N M D) of broadcast
    differences (640 x 640 x 1024 float32 would be 1.6 GB). Rounding can make the expansion
    slightly negative, hence the clamp.
    """
    xx = x.pow(2).sum(-1).unsqueeze(-1)
    yy = y.pow(2).sum(-1).unsqueeze(-2)
    return (xx + yy - 2.0 * (x @ y.transpose(-1, -2))).clamp_min(0.0)


def _batched(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Bring ``(N, D)`` / ``(B, N, D)`` inputs to ``(B, N, D)``; say whether they were batched."""
    if x.dim() != y.dim() or x.dim() not in (2, 3):
        raise ValueError(f"expected (N, D) and (M, D), or (B, N, D) and (B, M, D); got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"feature dimensions differ: {x.shape[-1]} vs {y.shape[-1]}")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: {x.shape[0]} vs {y.shape[0]}")
    if x.dim() == 2:
        return x.unsqueeze(0), y.unsqueeze(0), False
    return x, y, True


# ---------------------------------------------------------------------------------------------
# MMD


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0,
            kernel_num: int = 5) -> torch.Tensor:
    """Squared MMD between token sets with an equal-weight mixture of Gaussian RBF kernels.

    x: ``(N, D)`` or ``(B, N, D)``; y: ``(M, D)`` or ``(B, M, D)``. Returns a scalar: the
    biased (V-statistic) estimate ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``, where the
    means include the diagonal, so identical sets give exactly 0 (up to rounding); for a batch,
    the mean over the B pairs.

    Kernel ``k(u, v) = mean_k exp(-||u - v||^2 / s_k)`` with ``s_k = s0 * kernel_mul ** e_k``,
    ``e_k`` evenly spaced and centred on 0 (-2..2 for 5 kernels), and ``s0`` the mean squared
    distance over all pairs of distinct points of the pooled sample (per batch item). s0 is
    detached: it is a data-driven setting of the kernel widths for this batch, not a quantity
    to optimise; with a gradient through it the loss could also move by changing the overall
    spread of the tokens (which widens or narrows every kernel) rather than by matching them.
    Averaging (rather than summing) the kernels keeps the loss in [0, 2] whatever kernel_num;
    summing would only scale it by kernel_num.
    """
    if kernel_num < 1:
        raise ValueError("kernel_num must be >= 1")
    xb, yb, _ = _batched(x, y)
    n, m = xb.shape[1], yb.shape[1]
    z = torch.cat([xb, yb], dim=1)  # (B, N + M, D)
    d2 = _sq_dists(z, z)  # (B, N+M, N+M)
    p = n + m
    # The diagonal is 0 (up to rounding): the sum over all entries is the sum over distinct pairs.
    s0 = d2.detach().sum(dim=(1, 2)) / max(p * p - p, 1)  # (B,)
    # All points identical -> s0 = 0 and exp(-0/0) = nan; any positive floor gives k = 1 there.
    s0 = s0.clamp_min(torch.finfo(d2.dtype).tiny ** 0.5).view(-1, 1, 1)
    exps = torch.arange(kernel_num, dtype=d2.dtype, device=d2.device) - (kernel_num - 1) / 2
    k = sum(torch.exp(-d2 / (s0 * kernel_mul ** e)) for e in exps.tolist()) / kernel_num
    kxx = k[:, :n, :n].mean(dim=(1, 2))
    kyy = k[:, n:, n:].mean(dim=(1, 2))
    kxy = k[:, :n, n:].mean(dim=(1, 2))
    return (kxx + kyy - 2.0 * kxy).mean()


# ---------------------------------------------------------------------------------------------
# Exact optimal transport


def _uniform(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch, n), 1.0 / n, dtype=like.dtype, device=like.device)


def emd(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
        b: torch.Tensor | None = None) -> torch.Tensor:
    """Exact OT cost ``min_P <P, M>`` with ``M_ij = ||x_i - y_j||^2`` and marginals a, b.

    x: ``(N, D)`` or ``(B, N, D)``; y: ``(M, D)`` or ``(B, M, D)``; a: ``(N,)`` / ``(B, N)``,
    b: ``(M,)`` / ``(B, M)``, non-negative, default uniform; each is renormalised to sum to 1
    (softmax outputs cast to float64 can be off by ~1e-7 and POT requires equal masses).
    Returns a scalar in x's dtype (mean over the batch for batched inputs).

    Solved by POT's network simplex (``ot.emd2``) in float64 so the plan is an exact vertex.
    With torch inputs POT's backend returns a tensor carrying gradients: d cost / d M is the
    optimal plan, d cost / d a and d b are the dual potentials; autograd takes it from there
    back to x, y (through M) and to whatever produced a and b.
    """
    # Imported here: `import ot` takes ~3 s on top of torch (it loads scipy.stats through
    # ot.datasets), which MMD-only users and plain `import overheard.dali.losses` need not pay.
    import ot

    xb, yb, _ = _batched(x, y)
    bsz, n, m = xb.shape[0], xb.shape[1], yb.shape[1]
    x64, y64 = xb.to(torch.float64), yb.to(torch.float64)
    a64 = _uniform(bsz, n, x64) if a is None else a.to(torch.float64).reshape(bsz, n)
    b64 = _uniform(bsz, m, y64) if b is None else b.to(torch.float64).reshape(bsz, m)
    a64 = a64 / a64.sum(-1, keepdim=True)
    b64 = b64 / b64.sum(-1, keepdim=True)
    cost = _sq_dists(x64, y64)  # (B, N, M)
    # One exact solve per pair: every pair has its own transport plan and POT's exact solver
    # takes a single problem (the cost is dominated by the simplex, not by this Python loop).
    costs = [ot.emd2(a64[i], b64[i], cost[i], numItermax=EMD_MAX_ITER) for i in range(bsz)]
    return torch.stack(costs).mean().to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attentive OT


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) of probability vectors along ``dim``, with 0 log 0 = 0.

    The clamp only touches p = 0, where p * log(tiny) = 0 exactly, and keeps the gradient
    finite there (log p would give -inf and 0 * inf = nan).
    """
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim)


def _entropy_deficit(p: torch.Tensor) -> torch.Tensor:
    """``log N - H(p)`` along the last dim, ``(..., N) -> (...)``, computed as KL(p || uniform).

    In float64 on renormalised p: in float32, log N - H at uniform weights comes out around
    +-2e-7, which lam = 500 turns into a visible +-1e-4 (even a negative "regulariser").
    """
    p64 = p.to(torch.float64)
    p64 = p64 / p64.sum(-1, keepdim=True)
    n = p.shape[-1]
    return (p64 * torch.log((p64 * n).clamp_min(torch.finfo(torch.float64).tiny))).sum(-1)


class AttentiveWeights(nn.Module):
    """Learned OT marginals from two-way cross-attention (appendix F).

    forward(xa ``(B, Na, D)``, xv ``(B, Nv, D)``) -> a ``(B, Na)``, b ``(B, Nv)``, each a
    probability vector. Audio tokens query the image tokens and image tokens query the audio
    tokens (multi-head attention with its own query/key/value/output projections per
    direction); each attended token is averaged over the feature dimension into one score;
    ``softmax(score / temperature)`` over the tokens gives the weights. A token whose content
    is present in the other modality can thus be told apart from a modality-specific one.

    ``temperature`` is a hyper-parameter (appendix F uses a temperature but the value is not
    legible in our copy; 0.1 is our default): lower values let the weights concentrate more.
    ``heads`` must divide ``dim`` (1 is allowed). The module only shapes the training loss: it
    is trained with the audio encoder and discarded afterwards; inference never uses it.
    """

    def __init__(self, dim: int, heads: int = 8, temperature: float = 0.1):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"heads ({heads}) must be >= 1 and divide dim ({dim})")
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = float(temperature)
        self.audio_to_image = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.image_to_audio = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, xa: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        att_a, _ = self.audio_to_image(xa, xv, xv, need_weights=False)  # (B, Na, D)
        att_v, _ = self.image_to_audio(xv, xa, xa, need_weights=False)  # (B, Nv, D)
        a = torch.softmax(att_a.mean(-1) / self.temperature, dim=-1)
        b = torch.softmax(att_v.mean(-1) / self.temperature, dim=-1)
        return a, b


def attentive_ot(xa: torch.Tensor, xv: torch.Tensor, weights_module: AttentiveWeights,
                 lam: float, uniform: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attentive OT loss ``OT_M(a, b) + lam * ((log Na - H(a)) + (log Nv - H(b)))``.

    xa: audio tokens ``(B, Na, D)`` (or ``(Na, D)``); xv: image tokens ``(B, Nv, D)`` (or
    ``(Nv, D)``). Returns (loss scalar, a ``(B, Na)``, b ``(B, Nv)``); unbatched inputs give
    a ``(Na,)`` and b ``(Nv,)``. The cost is ``emd`` (squared Euclidean, mean over the batch).

    The regulariser is the entropy deficit of each marginal w.r.t. uniform: >= 0, and 0 exactly
    at uniform weights. Without it the cheapest plan puts all mass on the single closest
    audio/image pair. It equals -lam * (H(a) + H(b)) up to a constant, i.e. the paper's entropy
    term; the offset only makes the value readable. ``uniform=True`` skips the module and uses
    uniform weights (the paper's first epoch): then the loss is exactly ``emd(xa, xv)``.
    """
    xb, vb, batched = _batched(xa, xv)
    bsz, na, nv = xb.shape[0], xb.shape[1], vb.shape[1]
    if uniform:
        a, b = _uniform(bsz, na, xb), _uniform(bsz, nv, vb)
        loss = emd(xb, vb)
    else:
        a, b = weights_module(xb, vb)
        deficit = (_entropy_deficit(a) + _entropy_deficit(b)).mean()
        loss = emd(xb, vb, a, b) + lam * deficit.to(xb.dtype)
    if not batched:
        a, b = a[0], b[0]
    return loss, a, b


def lambda_schedule(epoch: float, first_uniform: bool = True, start: float = 500.0,
                    end: float = 100.0, ramp_epochs: int = 5) -> tuple[bool, float]:
    """(uniform, lam) for 0-based ``epoch`` (a float such as epoch + step / steps_per_epoch
    gives a per-step ramp).

    Appendix E: the first epoch uses uniform weights; lam then decreases from 500 to 100 by the
    end of the 5th epoch and stays at 100. The paper gives only these endpoints; the linear
    shape is our choice: lam = start at epoch 1, end at epoch ``ramp_epochs`` (the end of the
    5th epoch with the default 5), end afterwards. Before epoch 1 with ``first_uniform=False``,
    lam = start.
    """
    if first_uniform and epoch < 1:
        return True, float(start)
    if ramp_epochs <= 1:
        return False, float(end)
    t = min(max((epoch - 1) / (ramp_epochs - 1), 0.0), 1.0)
    return False, float(start + (end - start) * t)


def alignment_loss(kind: str, audio: torch.Tensor, vision: torch.Tensor, weights: AttentiveWeights | None = None,
                   lam: float = 0.0, uniform: bool = True) -> torch.Tensor:
    """D(audio (B, Na, D), vision (B, Nv, D)) averaged over the B pairs (float32 inputs), for one
    of ``ALIGNMENT_LOSSES``; ``weights``, ``lam`` and ``uniform`` only matter to attentive_ot."""
    if kind == "mmd":
        return mmd_rbf(audio, vision)
    if kind == "emd":
        return emd(audio, vision)
    return attentive_ot(audio, vision, weights, lam, uniform=uniform)[0]
