"""Triton backend of :func:`fastpeft.lora_linear_multi`: many LoRA adapters in one batch.

``lora_linear_multi_triton`` (called by ``fastpeft.functional.lora_linear_multi``) reshapes, follows
autocast and runs :class:`LoRAMultiFunction` on the grouped kernels of ``kernels/multi_lora.py``: a fixed
number of launches whatever the number of adapters, their ranks and the mix of rows. With nothing to
differentiate (decode, evaluation) it runs the forward alone, on the faster of the grouped kernels and, for
up to ``BGMV_MAX_ROWS`` rows out of training mode, the BGMV kernel (base GEMM + one launch, no grouping;
``forward_path``); beyond, with ids given per sequence (prefill) on sm_90+, the faster of the grouped kernels
and one persistent TMA kernel that fuses the shrink and each row block's adapters into the base GEMM
(``kernels.lora_tma.multi_forward_tma``).
"""
from __future__ import annotations

import torch

from ..kernels import lora as K
from ..kernels import lora_tma as KT
from ..kernels import multi_lora as MK
from .common import _bucket, _seed_arg, autocast_inputs, base_grads, no_second_derivatives, returned
from .lora import FUSED_SHRINK_MIN_ROWS


class LoRAMultiFunction(torch.autograd.Function):
    r"""Many adapters in one batch on the triton kernels; x is 2-D here, (M, K), and ids (M,) int64.

    Row m uses adapter a = ids[m] (none when a = -1) of rank r_a <= r_max, scaling s_a and dropout rate
    p_a; A_a = lora_A_stack[a, :r_a] (r_a, K), B_a = lora_B_stack[a, :, :r_a] (N, r_a). D (M, K) is the
    keep-mask, D[m, k] = draw(seed, m K + k) >= threshold(p_{ids[m]}) (fastpeft.reference.dropout_mask at
    row m's own rate), and drop(x)_m = D_m * x_m / (1 - p_a). Forward:

        u_m = drop(x)_m A_a^T                 (r_a,) fp32, zero-padded to r_max: the grouped shrink
        y_m = x_m W^T + b + s_a u_m B_a^T     cuBLAS for the base, then the grouped expand in place

    Backward, from dY (M, N). y_m depends on x_m through x_m W^T and through u_m, and on A_a, B_a only
    for the rows of adapter a. With v_m = dY_m B_a (r_a,) (the grouped shrink on dY against B):

        dL/du_m = s_a v_m
        dX_m    = dY_m W + (dL/du_m) A_a * D_m / (1 - p_a)
                = dY_m W + s_a D_m * (v_m A_a) / (1 - p_a)        cuBLAS, then the grouped expand (mask redrawn)
        dA_a    = sum_{m: ids[m] = a} (dL/du_m)^T drop(x)_m
                = s_a / (1 - p_a) * sum_m v_m^T (D_m * x_m)       (r_a, K): segment reduction
        dB_a    = sum_{m: ids[m] = a} s_a dY_m^T u_m              (N, r_a): segment reduction
        dA[a, r_a:] = 0, dB[a, :, r_a:] = 0                       (they never reach y); all of an
                                                                  adapter without rows is 0 too
        dW      = dY^T x,   db = sum_m dY_m                       (only when required)

    No gradient flows to scalings, ranks, ids or dropout_p (as in the reference).

    Saved for backward: x (not a dropped copy: the mask is a pure function of the seed and is redrawn),
    u (M, r_max) fp32 in sorted order, the grouping (order (M,), bounds (n+1,), blocks (3, T)), the
    per-adapter ranks / scales / thresholds (n,) and the parameters. v is recomputed from dY. No atomics:
    split reductions are added in a fixed order, so the same inputs give the same bits on every run.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks, dropout_p, seed):
        y, u, order, bounds, blocks, block_m, ranks, s_fwd, s_dx, thr = _grouped_forward(
            x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks, dropout_p, seed)
        ctx.save_for_backward(x, u, weight, lora_A_stack, lora_B_stack, order, bounds, blocks, ranks, s_fwd, s_dx,
                              thr)
        ctx.seed, ctx.has_mask, ctx.block_m, ctx.has_bias = seed, dropout_p is not None, block_m, bias is not None
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        no_second_derivatives("lora_linear_multi")
        x, u, weight, lora_A_stack, lora_B_stack, order, bounds, blocks, ranks, s_fwd, s_dx, thr = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        seed, has_mask, block_m = ctx.seed, ctx.has_mask, ctx.block_m
        k = x.shape[1]
        dx = dw = db = da = dbb = None
        group = dict(order=order, blocks=blocks, ranks=ranks, thresholds=thr, block_m=block_m)
        segments = dict(order=order, bounds=bounds, ranks=ranks, thresholds=thr)
        # The mask of x (M, K) element (m, k) is draw(seed, m K + k) >= thr[a], redrawn where it applies.
        mask = dict(seed=seed, has_mask=has_mask, mask_sm=k)
        if need_x or need_a:
            v = MK.shrink_op(dy, lora_B_stack, **group, scales=torch.ones_like(s_fwd))
        if need_a:
            da = MK.segment_grad_op(x, v, **segments, scales=s_dx, **mask, mask_sp=1, r_major=True)
        if need_bb:
            dbb = MK.segment_grad_op(dy, u, **segments, scales=s_fwd)
        if need_x:
            dx = dy @ weight
            MK.expand_op(dx, v, lora_A_stack, **group, scales=s_dx, **mask, mask_sn=1)
        dw, db = base_grads(dy, x, weight, need_w, need_b and ctx.has_bias)
        return dx, dw, db, da, dbb, None, None, None, None, None


def _constants(scalings, ranks, dropout_p, n, r_max, dev) -> tuple:
    """Per-adapter constants on the device (no host sync), rounded to fp32 last: ``(ranks int32, s_fwd, s_drop,
    s_dx, thr)`` with s_fwd = s_a (y += s_a u B_a^T, and dB), s_drop = 1/(1-p_a) (u = drop(x) A_a^T),
    s_dx = s_a/(1-p_a) (dX += s_a mask (v A_a)/(1-p_a), and dA) and thr the dropout thresholds (int64)."""
    ranks = (ranks.to(torch.int32) if ranks is not None
             else torch.full((n,), r_max, device=dev, dtype=torch.int32))
    s_fwd = scalings.to(torch.float32)
    if dropout_p is None:
        return (ranks, s_fwd, torch.ones(n, device=dev, dtype=torch.float32), s_fwd,
                torch.zeros(n, device=dev, dtype=torch.int64))
    p = dropout_p.to(torch.float64)
    keep_scale = 1.0 / (1.0 - p)
    return (ranks, s_fwd, keep_scale.to(torch.float32), (scalings.to(torch.float64) * keep_scale).to(torch.float32),
            _thresholds(p))


def _thresholds(p: torch.Tensor) -> torch.Tensor:
    """fastpeft.reference.dropout_threshold on the device: round(p * 2**32) (p * 2**32 is exact), int64."""
    return torch.round(p.to(torch.float64) * 2.0**32).clamp_(max=2.0**32).to(torch.int64)


def _grouped_forward(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks, dropout_p, seed) -> tuple:
    """The forward of ``LoRAMultiFunction`` on the grouped kernels, x (M, K), ids (M,) int64: ``(y, u, order, bounds,
    blocks, block_m, ranks, s_fwd, s_dx, thr)`` (y and what backward needs)."""
    m, k = x.shape
    n, r_max, _ = lora_A_stack.shape
    block_m = MK.block_m_for(x, m, n)
    order, bounds, blocks = MK.group_rows(ids, n, block_m)
    ranks, s_fwd, s_drop, s_dx, thr = _constants(scalings, ranks, dropout_p, n, r_max, x.device)
    has_mask = dropout_p is not None
    group = dict(order=order, blocks=blocks, ranks=ranks, thresholds=thr, block_m=block_m)
    # The mask of x (M, K) element (m, k) is draw(seed, m K + k) >= thr[a].
    u = MK.shrink_op(x, lora_A_stack.transpose(1, 2), **group, scales=s_drop, seed=seed, has_mask=has_mask,
                     mask_sm=k, mask_sq=1)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    MK.expand_op(y, u, lora_B_stack.transpose(1, 2), **group, scales=s_fwd)
    return y, u, order, bounds, blocks, block_m, ranks, s_fwd, s_dx, thr


def _bgmv_forward(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks, dropout_p, seed):
    """y = x W^T + b (cuBLAS) + each row's s_a (drop_a(x_m) A_a^T) B_a^T (the BGMV kernel, in place): 2 launches
    without dropout (ranks as given, int32 or int64; scalings fp32), no grouping, no host sync. x (M, K), ids (M,)."""
    n, r_max, k = lora_A_stack.shape
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    if ranks is None:
        ranks = torch.full((n,), r_max, device=x.device, dtype=torch.int32)
    if dropout_p is None:
        scales = scalings.to(torch.float32)
        thr = scales  # not read without the mask
    else:
        p = dropout_p.to(torch.float64)
        thr = _thresholds(p)
        scales = (scalings.to(torch.float64) / (1.0 - p)).to(torch.float32)  # s_a / (1 - p_a), folded into u
    # The mask of x (M, K) element (m, k) is draw(seed, m K + k) >= thr[a]: the grouped shrink's.
    return MK.bgmv_op(y, x, lora_A_stack, lora_B_stack, ids, ranks, scales, thr, seed=seed,
                      has_mask=dropout_p is not None, mask_sm=k, mask_sk=1)


# The no-grad forward: "bgmv" (base GEMM + the BGMV kernel), "grouped" (grouping, shrink, base GEMM, expand) or
# "fused" (one persistent TMA kernel, sm_90+, no dropout: kernels.lora_tma.multi_forward_tma). FASTPEFT_MULTI_PATH
# forces one ("bgmv" and "fused" at any number of rows, also in training mode); "auto" times bgmv against grouped
# up to BGMV_MAX_ROWS rows (kernels.lora.timed_choice) when not training, and beyond times grouped against fused
# where the fused kernel is offered (``_fused_refusal`` None, from FUSED_MIN_ROWS rows, ids per sequence of at
# least FUSED_MIN_SEQ tokens), else runs grouped; in training mode grouped: a training forward without grad
# (reentrant activation checkpointing) must give the bits of the grad path, which its recompute in backward runs
# (BGMV and the fused kernel sum in other orders). A forward with a gradient always runs the grouped kernels:
# their backward reads the grouping.
MULTI_PATHS = ("auto", "bgmv", "grouped", "fused")
# Every BGMV program recomputes its row's shrink, and rows of one adapter do not share its reads of A_a and B_a:
# the grouped kernels' tiles win once rows are many. 64: the decode batch sizes of the benchmarks (1..64);
# not measured on a GPU.
BGMV_MAX_ROWS = 64
_path_cache: dict = {}  # shape key -> "bgmv" or "grouped"


def path_mode() -> str:
    return K.env_choice("FASTPEFT_MULTI_PATH", MULTI_PATHS)


def forward_path(key: tuple, candidates: dict, device: torch.device, mode: str) -> str:
    """``"bgmv"`` or ``"grouped"`` (those offered, bgmv first) for a no-grad forward of this shape key, in
    ``path_mode()`` ``mode``; deterministic mode and tracing keep ``"bgmv"`` (both are deterministic, but a
    timed choice could differ between runs)."""
    return K.timed_choice(_path_cache, key, mode, device, candidates, "bgmv")


# The fused kernel's producers run one shrink K loop per adapter present in their block of 128 rows: offered by
# "auto" only where the ids are given per sequence (one adapter for each sequence's rows, a layout known without
# reading the ids) of at least FUSED_MIN_SEQ rows, so that a block mixes at most two adapters, and from
# FUSED_MIN_ROWS rows (the single-adapter fused forward's threshold). Then timed against the grouped kernels.
FUSED_MIN_SEQ = 128
FUSED_MIN_ROWS = FUSED_SHRINK_MIN_ROWS


def sequence_rows(ids: torch.Tensor) -> int:
    """Rows that are known to share one adapter, from the ids' strides alone: the rows per sequence where
    ``ids`` (B, T, ...) is one id per sequence expanded (stride 0 past the first dim, as ``expand_adapter_ids``
    builds it from per-sequence ids), else 1 (per-row ids: any mix)."""
    if ids.dim() >= 2 and ids.numel() and all(st == 0 for st in ids.stride()[1:]):
        return ids[0].numel()
    return 1


def _fused_refusal(x, weight, bias, lora_A_stack, lora_B_stack, dropout_p) -> str | None:
    """Why ``multi_forward_tma`` cannot run these tensors (None: it can)."""
    n, r_max, k = lora_A_stack.shape
    if dropout_p is not None:
        return "dropout applies (training mode, a rate > 0) and the fused kernel draws no mask"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if not KT.tma_supported(x.device):
        return f"it needs sm_90+ and a triton with tensor descriptors, got device {x.device}"
    if not KT.tma_precision_ok(x.dtype, path_mode() == "fused"):
        return ("float32 at torch's default matmul precision ('highest': no tensor cores) runs on cuBLAS; "
                "torch.set_float32_matmul_precision('high') allows TF32 and the fused kernel")
    waits = KT.waits_refusal()
    if waits is not None:
        return waits
    if n == 0 or r_max == 0:
        return "there is no adapter"
    isz = KT.fits_itemsize(x)
    if not KT.shrink_fits(r_max, isz):
        return f"r_max {r_max} is above " + ("64" if isz <= 2 else f"32 for {x.dtype}")
    if not KT.tma_shapes_ok(a=x, b=weight.t()):
        return (f"in and out features must be multiples of {16 // x.element_size()} for {x.dtype} (TMA rows), "
                f"got {k} and {weight.shape[0]}")
    dtypes = {t.dtype for t in (x, weight, lora_A_stack, lora_B_stack, bias) if t is not None}
    if len(dtypes) > 1:
        return f"x, W, the stacks and the bias must share one dtype, got {sorted(map(str, dtypes))}"
    return None


def _fused_forward(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks, dropout_p, seed):
    """y = x W^T + b + each row's s_a (x_m A_a^T) B_a^T in one TMA kernel (no dropout, sm_90+). x (M, K), ids (M,)."""
    return KT.multi_forward_tma(x=x, weight=weight, bias=bias, lora_A_stack=lora_A_stack, lora_B_stack=lora_B_stack,
                                scalings=scalings, ids=ids, ranks=ranks)


def _forward_no_grad(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks, dropout_p, seed,
                     training=True, seq_rows=1):
    """y of a forward with nothing to differentiate: the BGMV, grouped or fused kernels (see MULTI_PATHS);
    ``seq_rows``: rows known to share one adapter (``sequence_rows``)."""
    args = (x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks, dropout_p, seed)
    m = x.shape[0]
    n, r_max, k = lora_A_stack.shape
    mode = path_mode()
    if mode == "fused":
        why = _fused_refusal(x, weight, bias, lora_A_stack, lora_B_stack, dropout_p)
        if why is not None:
            raise ValueError(f"FASTPEFT_MULTI_PATH=fused is forced but cannot run here: {why}")
        return _fused_forward(*args)
    key = ("multi", _bucket(m), k, weight.shape[0], n, r_max, x.dtype, bias is not None, dropout_p is not None)
    if mode == "grouped" or mode == "auto" and (training or m > BGMV_MAX_ROWS):
        if (mode == "auto" and not training and m >= FUSED_MIN_ROWS and seq_rows >= FUSED_MIN_SEQ
                and _fused_refusal(x, weight, bias, lora_A_stack, lora_B_stack, dropout_p) is None):
            run = {"grouped": lambda: _grouped_forward(*args)[0], "fused": lambda: _fused_forward(*args)}
            return run[K.timed_choice(_path_cache, key + ("per-sequence",), mode, x.device, run, "grouped")]()
        return _grouped_forward(*args)[0]
    run = {"bgmv": lambda: _bgmv_forward(*args), "grouped": lambda: _grouped_forward(*args)[0]}
    return run[forward_path(key, run, x.device, mode)]()


def lora_linear_multi_triton(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks, dropout_p, seed,
                             training=True):
    """Triton path of ``lora_linear_multi``: x (..., in) any strides -> (..., out).

    ids: int64 of shape x.shape[:-1], already range-checked; ranks (n,) or None (all r_max); dropout_p
    (n,) or None (not training, or all rates zero); seed: int, or the one-element tensor drawn inside a
    compiled region (used only with dropout_p); training: the caller's mode (a no-grad forward in training
    mode keeps the grouped kernels' bits unless BGMV is forced). Under autocast the inputs are cast to the
    autocast dtype first, as nn.Linear's would be. With nothing to differentiate the forward runs without
    the autograd Function, on ``_forward_no_grad``'s choice.
    """
    if torch.is_autocast_enabled(x.device.type):  # x is on cpu / cuda here: both have autocast
        x, weight, bias, lora_A_stack, lora_B_stack = autocast_inputs(x, weight, bias, lora_A_stack, lora_B_stack)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear_multi_triton(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks,
                                            dropout_p, seed, training)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    seq_rows = sequence_rows(ids)
    ids2 = ids.reshape(-1).to(torch.int64)
    seed = _seed_arg(seed) if dropout_p is not None else 0
    args = (x2, weight, bias, lora_A_stack, lora_B_stack, scalings, ids2, ranks, dropout_p, seed)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A_stack.requires_grad
                                    or lora_B_stack.requires_grad or bias is not None and bias.requires_grad):
        y = LoRAMultiFunction.apply(*args)
    else:  # nothing to differentiate (decode, evaluation): the forward alone
        y = _forward_no_grad(*args, training=training, seq_rows=seq_rows)
    return y.view(*lead, weight.shape[0])
