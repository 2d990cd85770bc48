"""LoRA linear on the triton kernels (``kernels/lora.py``): :class:`LoRALinearFunction` and its entry
``_lora_linear_triton`` (called by ``fastpeft.functional.lora_linear``), and the two pieces the sparse
family reuses: the GEMM with a low-rank epilogue (``lora_gemm``) and the factor gradients
(``lora_factor_grads``)."""
from __future__ import annotations

import torch

from ..kernels import lora as K
from ..reference import dropout_threshold
from .common import _bucket, _seed_arg, autocast_inputs, base_grads


def dropout_constants(dropout_p: float) -> tuple:
    """``(threshold, 1 / (1 - p))`` of a dropout rate as the kernels take them; (0, 1.0) for p = 0."""
    if dropout_p > 0.0:
        return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)
    return 0, 1.0


class LoRALinearFunction(torch.autograd.Function):
    r"""Fused LoRA linear on the triton kernels; x is 2-D here, (M, K).

    Forward, with s the scaling, p the dropout rate, D = diag-free keep-mask of x (M, K) and
    drop(x) = D * x / (1 - p):

        u = drop(x) A^T                      (M, r) fp32, one pass over x (mask redrawn in the load)
        y = x W^T + s u B^T + b              one GEMM, s u B^T + b in its epilogue

    Backward, from dY (M, N). y depends on x through x W^T and through u:

        dL/du = s dY B = s v,    with v = dY B                                (M, r)
        dX    = dY W + (dL/du) A * D / (1 - p) = dY W + s D * (v A) / (1 - p)  (mask applied to v A)
        dA    = (dL/du)^T drop(x) = s v^T drop(x)                              (r, K)
        dB    = s dY^T u                                                       (N, r)
        dW    = dY^T x,   db = sum_m dY                                        (only when required)

    Saved for backward: x (not a dropped copy: the mask is a pure function of the seed and is redrawn),
    u (M, r) fp32 and the parameters. v is recomputed from dY. No atomics anywhere: partial sums are
    added in a fixed order, so the same inputs give the same bits on every run.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        thr, drop_scale = dropout_constants(dropout_p)
        k = x.shape[1]
        # The mask of x (M, K) element (m, k) is draw(seed, m K + k).
        u = K.shrink_op(x, lora_A.t(), scale=drop_scale, seed=seed, threshold=thr, mask_sp=k, mask_sq=1)

        key = ("fwd", _bucket(x.shape[0]), k, weight.shape[0], lora_A.shape[0], x.dtype, bias is not None)
        y = lora_gemm(x, weight.t(), u, lora_B.t(), bias=bias, scale=scaling, key=key)
        ctx.save_for_backward(x, u, weight, lora_A, lora_B)
        ctx.scaling, ctx.seed, ctx.thr, ctx.drop_scale = scaling, seed, thr, drop_scale
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        s, seed, thr, ds = ctx.scaling, ctx.seed, ctx.thr, ctx.drop_scale
        k = x.shape[1]
        dx = None
        v, da, dbb = lora_factor_grads(dy, x, u, lora_A, lora_B, scaling=s, drop_scale=ds, seed=seed, threshold=thr,
                                       need_v=need_x, need_a=need_a, need_b=need_bb)
        if need_x:
            key = ("dx", _bucket(x.shape[0]), weight.shape[0], k, lora_A.shape[0], x.dtype, thr > 0)
            dx = lora_gemm(dy, weight, v, lora_A, scale=s * ds, seed=seed, threshold=thr, key=key)
        dw, db = base_grads(dy, x, weight, need_w, need_b and ctx.has_bias)
        return dx, dw, db, da, dbb, None, None, None


def lora_factor_grads(dy, x, u, lora_A, lora_B, *, scaling, drop_scale, seed, threshold, need_v, need_a,
                      need_b) -> tuple:
    """``(v, dA, dB)`` on the kernels, each None when not needed: v = dY B (M, r) fp32 (for dX or dA),
    dA = s·ds·v^T (mask * x), dB = s·dY^T u. x (M, K), u = drop(x) A^T; ds = 1/(1-p), mask from seed."""
    v = da = db = None
    if need_v or need_a:
        v = K.shrink_op(dy, lora_B)
    if need_a:
        # dA^T = s ds drop-mask(x)^T v: x^T is (K, M), its element (k, m) is x's (m, k), masked by draw(seed, m K + k).
        da = K.shrink_op(x.t(), v, scale=scaling * drop_scale, seed=seed, threshold=threshold, mask_sp=1,
                         mask_sq=x.shape[1]).t().to(lora_A.dtype)
    if need_b:
        db = K.shrink_op(dy.t(), u, scale=scaling).to(lora_B.dtype)
    return v, da, db


def lora_gemm(a, b, lu, lv, *, bias=None, scale, seed=0, threshold=0, key):
    """``a @ b + scale * mask * (lu @ lv) + bias`` on the faster of the fused-epilogue GEMM and cuBLAS +
    an in-place low-rank update, chosen per shape ``key`` (``kernels.lora.choose_gemm``)."""

    def fused():
        return K.gemm_op(a, b, lu, lv, bias=bias, scale=scale, seed=seed, threshold=threshold)

    def cublas():
        out = torch.addmm(bias, a, b) if bias is not None else a @ b
        if threshold == 0:
            return out.addmm_(lu.to(out.dtype), lv, alpha=scale)
        return K.lowrank_add_op(out, lu, lv, scale=scale, seed=seed, threshold=threshold)

    return fused() if K.choose_gemm(key, fused, cublas, a.device) == "fused" else cublas()


def _lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """Triton path of ``lora_linear``: reshape to 2-D, follow autocast as nn.Linear does, and run the
    fused Function. x (..., in) any strides -> (..., out); ``dropout_p`` is already 0 when not training."""
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        y = LoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                     _seed_arg(seed))
    return y.view(*lead, weight.shape[0])
