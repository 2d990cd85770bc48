"""The LoRA linear layer on the CPU: one autograd Function that keeps no dropped copy of x.

``lora_linear_cpu`` (called by ``fastpeft.functional.lora_linear`` for CPU tensors on the reference
backend) reshapes x to 2-D, follows autocast as ``nn.Linear`` does, and runs :class:`LoRALinearCPUFunction`.
Its dropout mask is the CPU stream of ``fastpeft.reference.cpu_keep_mask`` (SplitMix64, 16-bit draws), a
pure function of the seed, redrawn in backward; ``fastpeft.reference.lora_linear_ref`` (the Philox stream of
the kernels) stays the oracle the triton kernels are tested against.
"""
from __future__ import annotations

import torch

from ..reference import cpu_keep_mask
from .common import autocast_inputs, returned, scaled_mm


class LoRALinearCPUFunction(torch.autograd.Function):
    r"""LoRA linear on CPU tensors; x is 2-D here, (M, K), W (N, K), A (r, K), B (N, r), s the scaling.

    With D (M, K) the keep-mask of the seed (CPU stream, drop rate p), c = 1 / (1 - p) and drop(x) = c D ⊙ x:

        u = (D ⊙ x) A^T                            (M, r), without the 1/(1-p): it goes into the scalars below
        y = x W^T + b + s c u B^T                  addmm, then addmm_ of the rank-r update in place

    Backward, from dY (M, N). y depends on x through x W^T and through c u:

        dL/du = s c dY B = v_s,   v_s = s c (dY B)                           (M, r)
        dX    = dY W + D ⊙ (v_s A)                 addcmul_ of the masked update into dX in place
                (without dropout: dX = dY W + s v A, one addmm_ in place)
        dA    = v_s^T (D ⊙ x)                                                (r, K)
        dB    = s c dY^T u                                                   (N, r)
        dW    = dY^T x,   db = sum_m dY_m                                    (only when required)

    Saved for backward: x, u (M, r), the parameters and the seed; D is redrawn from the seed (2 ms for
    2048 x 1024 on 2 cores, ~8 µs for 1 x 1024) instead of stored, and drop(x) (an M x K copy) is never kept.
    Outside torch.compile the mask is drawn by row pieces of ~256 Ki elements, so neither pass allocates an
    M x K temporary besides dX itself. The scales s and c sit on the (M, r) and (r, K) factors, never on an
    M x K piece.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        y, u = _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        seed_t = seed if isinstance(seed, torch.Tensor) else None
        ctx.save_for_backward(x, u, weight, lora_A, lora_B, seed_t)
        ctx.seed = None if seed_t is not None else seed
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, lora_A, lora_B, seed_t = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        seed = seed_t if seed_t is not None else ctx.seed
        dy = dy.contiguous()
        u = recorded_u(u, x, lora_A, ctx.dropout_p, seed) if need_bb else u
        dx, da, dbb = _backward(dy, x, u, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed,
                                need_x, need_a, need_bb)
        dw = torch.mm(dy.t(), x) if need_w else None
        db = dy.sum(0) if need_b and ctx.has_bias else None
        return dx, dw, db, da, dbb, None, None, None


def recorded_u(u, x, lora_A, p: float, seed):
    """u = (D ⊙ x) A^T as the backward uses it: the saved one, or under ``create_graph`` (autograd records the
    backward, for second derivatives) recomputed by recorded ops, so that dB = s c dY^T u carries its dependence
    on x and A (the saved u, made without a graph, would read as a constant: second derivatives silently wrong).
    That recomputation forms the (M, K) dropped x; double backward only."""
    if not torch.is_grad_enabled():
        return u
    m, k = x.shape
    xd = x if p == 0.0 else x * cpu_keep_mask(seed, m, k, p, x.device)
    return xd @ lora_A.t()


def _backward(dy, x, u, weight, lora_A, lora_B, s: float, p: float, seed, need_x: bool, need_a: bool,
              need_b: bool) -> tuple:
    """``(dX, dA, dB)`` of ``LoRALinearCPUFunction`` (see there), each None unless needed; dy (M, N) contiguous,
    ``weight`` the (N, K) matrix of dX = dY weight + ... (RoSA passes W + Δ)."""
    m, k = x.shape
    c = 1.0 / (1.0 - p) if p > 0.0 else 1.0
    dx = da = dbb = None
    if need_x or need_a:
        v = torch.mm(dy, lora_B)
    if need_x:
        dx = torch.mm(dy, weight)
    # Every scale goes in as a product's alpha (scaled_mm / addmm_): applied before the one rounding, so that no
    # fp16 intermediate is a multiple of what autograd holds (s dY B, then A, then c): dA formed unscaled and then
    # multiplied by s = 0.25 overflowed at |dA| ~ 16k, s c (dY B) at p = 0.9 overflowed where dX did not.
    if p == 0.0:
        if need_x:
            dx.addmm_(v, lora_A, alpha=s)
        if need_a:
            da = scaled_mm(v.t(), x, s)
    elif need_x or need_a:
        # The mask is redrawn piece by piece; each piece's D * (v_s A) and D * x are cache-sized. A decode
        # step (one piece) takes no views: ~1 µs each, against a few µs for the whole update at M = 1.
        vs = v.mul_(s)  # s dY B, as autograd holds it; c goes in after the product with A (or x)
        pieces = _row_pieces(m, k)
        one = len(pieces) == 1
        for rows in pieces:
            keep = cpu_keep_mask(seed, rows.stop - rows.start, k, p, x.device, rows.start)
            vs_r = vs if one else vs[rows]
            if need_x:
                # no add_(..., alpha=c) of a masked product: inductor (torch 2.13) miscompiles
                # add_(mm(..).mul_(bool mask), alpha=c) in this backward (dX off by 1e4)
                (dx if one else dx[rows]).addcmul_(scaled_mm(vs_r, lora_A, c), keep)
            if need_a:
                part = scaled_mm(vs_r.t(), (x if one else x[rows]).mul(keep), c)
                da = part if da is None else da.add_(part)
    if need_b:
        dbb = scaled_mm(dy.t(), u, s * c)
    return dx, da, dbb


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> tuple:
    """``(y, u)`` of ``LoRALinearCPUFunction``'s forward (see there: u is (D ⊙ x) A^T, without 1/(1-p)); x (M, K)."""
    m, k = x.shape
    alpha = scaling
    if dropout_p > 0.0:
        pieces = _row_pieces(m, k)
        if len(pieces) == 1:
            keep = cpu_keep_mask(seed, m, k, dropout_p, x.device)
            u = torch.mm(x.mul(keep), lora_A.t())
        else:  # the mask and the dropped rows of one piece at a time (cache-sized, freed at once)
            u = x.new_empty(m, lora_A.shape[0])
            for rows in pieces:
                keep = cpu_keep_mask(seed, rows.stop - rows.start, k, dropout_p, x.device, rows.start)
                torch.mm(x[rows].mul(keep), lora_A.t(), out=u[rows])
        alpha = scaling * (1.0 / (1.0 - dropout_p))  # s c as backward has it: c on a scalar, not on x or u
    else:
        u = torch.mm(x, lora_A.t())
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    y.addmm_(u, lora_B.t(), alpha=alpha)  # no M x N temporary for the update
    return y, u


# Elements of x per piece when the mask is drawn by pieces: the piece's mask words, dropped rows and
# D * (v A) rows stay in L2 (256 Ki elements: 1 MiB fp32), and no M x K temporary is ever allocated.
_PIECE = 1 << 18


def _row_pieces(m: int, k: int) -> list:
    """Row slices covering 0..m-1, ~_PIECE elements each; one slice while torch.compile traces (inductor
    fuses the mask into its loops, and out= writes into views do not trace)."""
    if torch.compiler.is_compiling() or m * k <= _PIECE:
        return [slice(0, m)]
    step = max(1, _PIECE // max(k, 1))
    return [slice(i, min(i + step, m)) for i in range(0, m, step)]


def lora_linear_cpu(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed) -> torch.Tensor:
    """``y = x W^T + b + scaling (drop(x) A^T) B^T`` on CPU tensors: x (..., in), any strides -> (..., out).

    ``dropout_p`` is the rate in effect (0 when not training); ``seed`` an int or the one-element tensor
    drawn inside a compiled region, required when ``dropout_p > 0``. Under autocast the inputs are cast to
    the autocast dtype first, as nn.Linear's would be.
    """
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed is required when training with dropout_p > 0, got None")
    if torch.is_autocast_enabled("cpu"):
        x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
        with torch.autocast("cpu", enabled=False):
            return lora_linear_cpu(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad
                                    or lora_B.requires_grad or bias is not None and bias.requires_grad):
        y = LoRALinearCPUFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
    else:  # nothing to differentiate (decode, evaluation): the forward without the autograd Function's cost
        y = _forward(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)[0]
    return y if x2 is x else y.view(*x.shape[:-1], weight.shape[0])
