"""LoRA linear on the triton kernels (``kernels/lora.py``): :class:`LoRALinearFunction` and its entry
``_lora_linear_triton`` (called by ``fastpeft.functional.lora_linear``), and the two pieces the sparse
family reuses: the GEMM with a low-rank epilogue (``lora_gemm``), the factor gradients
(``lora_factor_grads``) and the plain torch composition of the forward and backward (``torch_forward``,
``torch_backward``)."""
from __future__ import annotations

import functools

import torch

from ..kernels import lora as K
from ..kernels import lora_tma as KT
from ..kernels import quant as KQ
from ..reference import dropout_threshold, lora_linear_ref
from .common import (_bucket, _seed_arg, autocast_enabled, autocast_inputs, base_grads, recorded_grads,
                     returned, scaled_mm)


def dropout_constants(dropout_p: float) -> tuple:
    """``(threshold, 1 / (1 - p))`` of a dropout rate as the kernels take them; (0, 1.0) for p = 0."""
    if dropout_p > 0.0:
        return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)
    return 0, 1.0


class LoRALinearFunction(torch.autograd.Function):
    r"""LoRA linear on the triton kernels or, where it is faster, the plain torch composition; x is 2-D
    here, (M, K).

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

    Forward and backward each run the fastest of their compositions of these formulas, measured once per
    shape (``kernels.lora.timed_choice``; deterministic mode and tracing keep ``"kernels"``):
    ``"kernels"`` (the shrink kernel and ``lora_gemm``, itself the fastest of its GEMMs) and ``"torch"``
    (cuBLAS matmuls, the eager reference's cost; with dropout the masked pieces, u and dA and the
    masked low-rank add of dX, stay on the kernels, which redraw the mask instead of storing it).

    dY (M, N) is the backward's largest read after W. ``"kernels"`` reads it three times: v = dY B and
    dB = s dY^T u (two shrinks) and dX = dY W. The backward also offers ``"kernels-dy1"`` where both v and
    dB are needed: v and dB from one read of dY (``_lora_dy_pass_kernel``: each dY tile feeds dY_tile B_tile
    into v and dY_tile^T u_rows into a dB partial; partials added in a fixed order), then dA from x (mask
    redrawn) and dX through ``lora_gemm``, as in ``"kernels"``. Two reads of dY instead of three; the
    timing keeps it where that beats the partials' traffic (benchmarks/roofline.py). FASTPEFT_LORA_GEMM
    forcing a GEMM forces ``"kernels"``, ``torch`` forces ``"torch"``.

    On sm_90+ from ``FUSED_SHRINK_MIN_ROWS`` rows, the forward also offers ``"tma-shrink"``: u and y from one
    TMA kernel (``kernels.lora_tma.lora_forward_tma``), the shrink's products accumulated by the tiles of
    column block 0 from the x tiles they load anyway, so x is read once (the shrink's separate pass over x
    is ~7 % of nn.Linear's time at M 8192, K = N 4096 on an H100 by benchmarks/roofline.py).
    The backward likewise offers ``"tma-dy"`` where dX is needed: dX, v = dY B and dB's per-row-block
    partials from one TMA kernel (``kernels.lora_tma.lora_backward_tma``: the tiles of dX's column block 0
    also accumulate v and dY_tile^T u from the dY tiles they load and publish v; the partials are added in
    a fixed order), then dA from x. dY is read once. FASTPEFT_LORA_GEMM=tma-shrink forces both (the
    backward's kernels with the TMA GEMM where dX is not needed).

    Saved for backward: x (not a dropped copy: the mask is a pure function of the seed and is redrawn),
    u (M, r) (fp32 on the kernels, x's dtype on torch) and the parameters. v is recomputed from dY. No
    atomics anywhere on the kernels: partial sums are added in a fixed order, so the same inputs give the
    same bits on every run.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        thr, drop_scale = dropout_constants(dropout_p)
        y, u = _forward(x, weight, bias, lora_A, lora_B, scaling, thr, drop_scale, seed)
        ctx.save_for_backward(x, u, weight, lora_A, lora_B)
        ctx.scaling, ctx.seed, ctx.thr, ctx.drop_scale, ctx.p = scaling, seed, thr, drop_scale, dropout_p
        ctx.has_bias = bias is not None
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph: the oracle's formula with the kernels' mask, recorded
            out = lora_linear_ref(x, weight, None, lora_A, lora_B, ctx.scaling, ctx.p, True, ctx.seed)
            dx, dw, _, da, dbb = recorded_grads(out, (x, weight, None, lora_A, lora_B), ctx.needs_input_grad[:5],
                                                dy, 0)
            return dx, dw, dy.sum(0) if need_b and ctx.has_bias else None, da, dbb, None, None, None
        dx, da, dbb = _backward(dy, x, u, weight, lora_A, lora_B, ctx.scaling, ctx.seed, ctx.thr, ctx.drop_scale,
                                need_x, need_a, need_bb)
        dw, db = base_grads(dy, x, weight, need_w, need_b and ctx.has_bias)
        return dx, dw, db, da, dbb, None, None, None


def _backward(dy, x, u, weight, lora_A, lora_B, s, seed, thr, ds, need_x, need_a, need_bb) -> tuple:
    """``(dX, dA, dB)`` of ``LoRALinearFunction``'s backward (each None when not needed) on the fastest of its
    compositions for this shape (see there); ``weight`` (N, K) is read for dX only (None without it: QLoRA
    dequantizes it only then)."""
    m, k = x.shape
    n = lora_B.shape[0]
    key = ("bwd", _bucket(m), k, n, lora_A.shape[0], x.dtype, thr > 0, need_x, need_a, need_bb)

    def kernels(one_dy_pass=False):
        dx = None
        v, da, dbb = lora_factor_grads(dy, x, u, lora_A, lora_B, scaling=s, drop_scale=ds, seed=seed,
                                       threshold=thr, need_v=need_x, need_a=need_a, need_b=need_bb,
                                       one_dy_pass=one_dy_pass)
        if need_x:
            dx = lora_gemm(dy, weight, v, lora_A, scale=s * ds, seed=seed, threshold=thr,
                           key=dx_key(m, n, k, lora_A.shape[0], x.dtype, thr > 0))
        return dx, da, dbb

    def composed():
        return torch_backward(dy, x, u, weight, lora_A, lora_B, scaling=s, drop_scale=ds, seed=seed, threshold=thr,
                              need_x=need_x, need_a=need_a, need_b=need_bb)

    def tma_dy():
        # dX, v and dB's partials from one TMA kernel over dY; dA from x as on the kernels.
        dx, v, db = KT.lora_backward_tma(dy=dy, w=weight, lora_A=lora_A, lora_B=lora_B,
                                         u=u if need_bb else None, scale=s * ds, seed=seed, threshold=thr)
        da = K.shrink_op(x.t(), v, scale=s * ds, seed=seed, threshold=thr, mask_sp=1,
                         mask_sq=k).t().to(lora_A.dtype) if need_a else None
        return dx, da, db.mul_(s).to(lora_B.dtype) if need_bb else None

    run = {"kernels": kernels, "torch": composed}
    if (need_x or need_a) and need_bb:  # v and dB both needed: one pass over dY gives both
        run = {"kernels": kernels, "kernels-dy1": functools.partial(kernels, True), "torch": composed}
    if need_x and _fused_dy_offered(dy, weight, lora_B, thr > 0):
        run["tma-dy"] = tma_dy
    return run[choose_path(key, run, dy.device)]()


def _forward(x, weight, bias, lora_A, lora_B, scaling, thr, drop_scale, seed) -> tuple:
    """``(y, u)`` of ``LoRALinearFunction``'s forward on the fastest of its compositions (``_FORWARDS``): those
    offered here are built only where the choice needs them (a shape to time, a forced fused path, a measured
    winner not every call can run)."""
    m = x.shape[0]
    gkey = fwd_key(m, x.shape[1], weight.shape[0], lora_A.shape[0], x.dtype, bias is not None)  # the GEMM's
    key = gkey + (thr > 0,)
    args = (x, weight, bias, lora_A, lora_B, scaling, thr, drop_scale, seed, gkey)
    name = _settled_forward(key, x.device)
    if name is None:
        run = {n: functools.partial(_FORWARDS[n], *args) for n in offered_forwards(x, weight, lora_A)}
        name = choose_path(key, run, x.device)
    return _FORWARDS[name](*args)


def offered_forwards(x, weight, lora_A) -> list:
    """The names of ``_FORWARDS`` this forward can run, the kernels first: the fused TMA shrink where
    ``_fused_shrink_offered``, the one-launch ``decode`` where ``_decode_offered``."""
    names = ["kernels"] + (["tma-shrink"] if _fused_shrink_offered(x, weight, lora_A) else []) + ["torch"]
    return names + (["decode"] if _decode_offered(x.shape[0]) else [])


def _settled_forward(key: tuple, device: torch.device) -> str | None:
    """``choose_path``'s answer for the forward where it needs no candidates: a forced GEMM (the kernels),
    torch, or decode (outside tracing), or in ``auto`` mode the settled choice when it is a composition every
    call can run ("kernels", "torch", and "decode": any strides and rows; tracing settles on the kernels).
    None where the candidates must be built (a forced or measured fused TMA path: not every x can take it)."""
    mode = K.gemm_mode()
    if mode == "auto":
        name = K.settled_choice(_path_cache, key, device, "kernels", "kernels")
        return name if name in ("kernels", "torch", "decode") else None
    if mode in ("fused", "tma", "cublas", "torch"):
        return "torch" if mode == "torch" else "kernels"
    return "decode" if mode == "decode" and not torch.compiler.is_compiling() else None


def _fwd_kernels(x, weight, bias, lora_A, lora_B, scaling, thr, drop_scale, seed, gkey) -> tuple:
    # The mask of x (M, K) element (m, k) is draw(seed, m K + k).
    u = K.shrink_op(x, lora_A.t(), scale=drop_scale, seed=seed, threshold=thr, mask_sp=x.shape[1], mask_sq=1)
    return lora_gemm(x, weight.t(), u, lora_B.t(), bias=bias, scale=scaling, key=gkey), u


def _fwd_torch(x, weight, bias, lora_A, lora_B, scaling, thr, drop_scale, seed, gkey) -> tuple:
    return torch_forward(x, weight, bias, lora_A, lora_B, scaling=scaling, drop_scale=drop_scale, seed=seed,
                         threshold=thr)


def _fwd_tma_shrink(x, weight, bias, lora_A, lora_B, scaling, thr, drop_scale, seed, gkey) -> tuple:
    return KT.lora_forward_tma(x=x, w_t=weight.t(), lora_A=lora_A, lv=lora_B.t(), bias=bias, scale=scaling,
                               drop_scale=drop_scale, seed=seed, threshold=thr)


def _fwd_decode(x, weight, bias, lora_A, lora_B, scaling, thr, drop_scale, seed, gkey) -> tuple:
    return KQ.lora_decode(x, weight, lora_A, lora_B, bias, scaling, drop_scale, seed, thr)


# The forward's compositions, in the order they are offered (the first, the kernels, wins ties and fixed modes).
_FORWARDS = {"kernels": _fwd_kernels, "tma-shrink": _fwd_tma_shrink, "torch": _fwd_torch, "decode": _fwd_decode}


def _decode_offered(m: int) -> bool:
    """Whether the forward can run ``kernels.quant.lora_decode`` (y and u in one launch): up to
    ``DENSE_MAX_M`` rows (any when FASTPEFT_LORA_GEMM=decode forces it), not while tracing (a plain launcher,
    not a registered op)."""
    return (m <= KQ.DENSE_MAX_M or K.gemm_mode() == "decode") and not torch.compiler.is_compiling()


# Below this many rows the shrink's read of x is small beside W's, and the forward is not offered the
# fused shrink (nor made to pay for its checks) unless FASTPEFT_LORA_GEMM=tma-shrink forces it.
FUSED_SHRINK_MIN_ROWS = 256


def _fused_shrink_offered(x, weight, lora_A) -> bool:
    """Whether the forward can run ``kernels.lora_tma.lora_forward_tma`` (the shrink fused into the TMA GEMM)."""
    return _tma_fused_offered(x, weight.t(), lora_A, lambda: KT.shrink_fits(lora_A.shape[0], KT.fits_itemsize(x)))


def _fused_dy_offered(dy, weight, lora_B, masked: bool) -> bool:
    """Whether the backward can run ``kernels.lora_tma.lora_backward_tma`` (the dY pass fused into dX's TMA
    GEMM), with dY (M, N) @ W (N, K) as the GEMM (``masked``: dX has dropout's mask, which leaves configs up to
    rank 32)."""
    return _tma_fused_offered(dy, weight, lora_B,
                              lambda: KT.dy_pass_fits(lora_B.shape[1], masked, KT.fits_itemsize(dy)))


def _tma_fused_offered(a, b, factor, fits) -> bool:
    """The rule both fused TMA paths share, for the GEMM a (M, K) @ b (K, N) with the adapter factor read
    beside a: from FUSED_SHRINK_MIN_ROWS rows (any when FASTPEFT_LORA_GEMM=tma-shrink forces them), not
    while tracing, on a TMA device and dtype (``tma_precision_ok``: not fp32 at full precision unless forced),
    where ``fits()`` (the rank has configs), with TMA rows and one dtype."""
    forced = K.gemm_mode() == "tma-shrink"
    if a.shape[0] < FUSED_SHRINK_MIN_ROWS and not forced:
        return False
    return (not torch.compiler.is_compiling() and KT.tma_supported(a.device) and KT.tma_precision_ok(a.dtype, forced)
            and fits() and KT.tma_shapes_ok(a=a, b=b) and factor.dtype == a.dtype and KT.waits_refusal() is None)


def fwd_key(m: int, k: int, n: int, rank: int, dtype: torch.dtype, has_bias: bool) -> tuple:
    """The shape key of the forward's GEMM choice (``lora_gemm``) for x (m, k) @ W^T (k, n) at this rank."""
    return ("fwd", _bucket(m), k, n, rank, dtype, has_bias)


def dx_key(m: int, n: int, k: int, rank: int, dtype: torch.dtype, masked: bool) -> tuple:
    """The shape key of dX's GEMM choice (``lora_gemm``) for dY (m, n) @ W (n, k) at this rank."""
    return ("dx", _bucket(m), n, k, rank, dtype, masked)


def torch_forward(x, weight, bias, lora_A, lora_B, *, scaling, drop_scale, seed, threshold) -> tuple:
    """``(y, u)`` of the LoRA forward composed of cuBLAS matmuls: u = drop(x) A^T (x's dtype; fp32 from the
    shrink kernel with dropout, which redraws the mask instead of storing it), y = x W^T + b + s u B^T.
    The sparse family passes W + Δ as ``weight``."""
    if threshold > 0:
        u = K.shrink_op(x, lora_A.t(), scale=drop_scale, seed=seed, threshold=threshold, mask_sp=x.shape[1],
                        mask_sq=1)
    else:
        u = x @ lora_A.t()
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return y.addmm_(u.to(y.dtype), lora_B.t(), alpha=scaling), u


def torch_backward(dy, x, u, weight, lora_A, lora_B, *, scaling, drop_scale, seed, threshold, need_x, need_a,
                   need_b) -> tuple:
    """``(dX, dA, dB)`` of the LoRA backward composed of cuBLAS matmuls (formulas in
    :class:`LoRALinearFunction`), each None when not needed; with dropout the masked pieces (dA and the
    low-rank add of dX) stay on the kernels, which redraw the mask. ``weight`` is read for dX only (the
    sparse family passes W + Δ, or None when dX is not needed)."""
    s, ds, thr = scaling, drop_scale, threshold
    dx = da = db = None
    v = dy @ lora_B if need_x or need_a else None
    if need_b:
        db = scaled_mm(dy.t(), u.to(dy.dtype), s).to(lora_B.dtype)  # s as alpha: an fp16 dB / s can overflow
    if need_a and thr > 0:
        da = K.shrink_op(x.t(), v, scale=s * ds, seed=seed, threshold=thr, mask_sp=1,
                         mask_sq=x.shape[1]).t().to(lora_A.dtype)
    elif need_a:
        da = scaled_mm(v.t(), x, s).to(lora_A.dtype)
    if need_x:
        dx = dy @ weight
        if thr > 0:
            dx = K.lowrank_add_op(dx, v, lora_A, scale=s * ds, seed=seed, threshold=thr)
        else:
            dx.addmm_(v, lora_A, alpha=s)
    return dx, da, db


_path_cache: dict = {}  # shape key -> "kernels" or "torch"


def choose_path(key: tuple, candidates: dict, device: torch.device) -> str:
    """The path (a name of ``candidates``: ``"kernels"``, ``"torch"``, the backward's ``"kernels-dy1"`` and
    ``"tma-dy"``, the forward's ``"tma-shrink"`` and ``"decode"``) for a LoRA forward / backward of this shape
    key: FASTPEFT_LORA_GEMM=torch forces torch, ``tma-shrink`` the fused TMA paths (the backward's kernels where
    it has no ``"tma-dy"``), ``decode`` the forward's one launch (the backward's kernels), a forced GEMM
    (fused / tma / cublas) the kernels; ``auto`` times them all (``kernels.lora.timed_choice``);
    deterministic mode and torch.compile tracing keep the kernels."""
    mode = K.gemm_mode()
    if mode == "tma-shrink":  # the fused TMA path of each direction; a backward without dX: the kernels (TMA)
        mode = "tma-shrink" if key[0] == "fwd" else ("tma-dy" if "tma-dy" in candidates else "kernels")
    elif mode == "decode":
        mode = "decode" if key[0] == "fwd" else "kernels"
    elif mode not in ("auto", "torch"):
        mode = "kernels"
    return K.timed_choice(_path_cache, key, mode, device, candidates, "kernels")


def lora_factor_grads(dy, x, u, lora_A, lora_B, *, scaling, drop_scale, seed, threshold, need_v, need_a,
                      need_b, one_dy_pass=False) -> tuple:
    """``(v, dA, dB)`` on the kernels, each None when not needed: v = dY B (M, r) fp32 (for dX or dA),
    dA = s·ds·v^T (mask * x), dB = s·dY^T u. x (M, K), u = drop(x) A^T; ds = 1/(1-p), mask from seed.
    ``one_dy_pass``: v and dB from one read of dY (``kernels.lora.lora_dy_pass``) where both are needed,
    instead of two shrinks."""
    v = da = db = None
    if one_dy_pass and (need_v or need_a) and need_b:
        v, db = K.dy_pass_op(dy, lora_B, u, scale=scaling)
        db = db.to(lora_B.dtype)
        need_b = False
    elif need_v or need_a:
        v = K.shrink_op(dy, lora_B)
    if need_a:
        # dA^T = s ds drop-mask(x)^T v: x^T is (K, M), its element (k, m) is x's (m, k), masked by draw(seed, m K + k).
        da = K.shrink_op(x.t(), v, scale=scaling * drop_scale, seed=seed, threshold=threshold, mask_sp=1,
                         mask_sq=x.shape[1]).t().to(lora_A.dtype)
    if need_b:
        db = K.shrink_op(dy.t(), u, scale=scaling).to(lora_B.dtype)
    return v, da, db


def _gemm_fused(a, b, lu, lv, bias, scale, seed, threshold):
    return K.gemm_op(a, b, lu, lv, bias=bias, scale=scale, seed=seed, threshold=threshold)


def _gemm_tma(a, b, lu, lv, bias, scale, seed, threshold):
    return KT.lora_gemm_tma(a=a, b=b, lu=lu, lv=lv, bias=bias, scale=scale, seed=seed, threshold=threshold)


def _gemm_cublas(a, b, lu, lv, bias, scale, seed, threshold):
    out = torch.addmm(bias, a, b) if bias is not None else a @ b
    if threshold == 0:
        return out.addmm_(lu.to(out.dtype), lv, alpha=scale)
    return K.lowrank_add_op(out, lu, lv, scale=scale, seed=seed, threshold=threshold)


_GEMMS = {"fused": _gemm_fused, "tma": _gemm_tma, "cublas": _gemm_cublas}


def gemm_candidates(a, b, lu, lv, *, bias=None, scale, seed=0, threshold=0) -> dict:
    """The GEMMs that can compute ``a @ b + scale * mask * (lu @ lv) + bias`` here, name -> zero-argument
    callable: ``"fused"`` (the epilogue GEMM), ``"tma"`` (only where ``tma_supported``, ``tma_precision_ok`` and
    ``tma_shapes_ok``) and ``"cublas"`` (cuBLAS, then the low-rank update in place)."""
    args = (a, b, lu, lv, bias, scale, seed, threshold)
    names = ("fused", "cublas")
    # The TMA kernel is a plain launcher, not a registered op: torch.compile does not trace it.
    if (not torch.compiler.is_compiling() and KT.tma_supported(a.device)
            and KT.tma_precision_ok(a.dtype, K.gemm_mode() in ("tma", "tma-shrink")) and KT.tma_shapes_ok(a=a, b=b)):
        names = ("fused", "tma", "cublas")
    return {name: functools.partial(_GEMMS[name], *args) for name in names}


def lora_gemm(a, b, lu, lv, *, bias=None, scale, seed=0, threshold=0, key):
    """``a @ b + scale * mask * (lu @ lv) + bias`` on the fastest of ``gemm_candidates``, chosen per shape
    ``key`` (``kernels.lora.choose_gemm``). The candidates are built only where the choice needs them (a
    forced TMA, a shape to time): building them and their TMA checks took 1.4 µs of a 14 µs decode call."""
    name = K.settled_gemm(key, a.device)
    if name is None:
        run = gemm_candidates(a, b, lu, lv, bias=bias, scale=scale, seed=seed, threshold=threshold)
        name = K.choose_gemm(key, run, a.device)
    return _GEMMS[name](a, b, lu, lv, bias, scale, seed, threshold)


def _lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """Triton path of ``lora_linear``: reshape to 2-D, follow autocast as nn.Linear does, and run the
    fused Function. x (..., in) any strides -> (..., out); ``dropout_p`` is already 0 when not training."""
    if autocast_enabled(x):
        x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
        with torch.autocast(x.device.type, enabled=False):
            return _lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a 2-D x as it is: the kernels take any strides
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad
                                    or lora_B.requires_grad or bias is not None and bias.requires_grad):
        y = LoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                     _seed_arg(seed))
    else:  # nothing to differentiate (decode, evaluation): the forward without the autograd Function's cost
        thr, drop_scale = dropout_constants(dropout_p)
        y = _forward(x2, weight, bias, lora_A, lora_B, float(scaling), thr, drop_scale, _seed_arg(seed))[0]
    return y if x2 is x else y.view(*x.shape[:-1], weight.shape[0])
