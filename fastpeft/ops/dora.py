"""DoRA linear (weight-decomposed LoRA, Liu et al. 2024) with PEFT 0.21's semantics, without ever forming
the (out, in) matrix ``W + sBA``: the autograd Function, on the kernels of ``kernels/dora.py`` or on plain
PyTorch, and the weight norm.

``g = m / ‖W + sBA‖_row`` is computed in fp32 (fp64 for fp64 inputs) and applied to the fp32 accumulator,
never folded into a low-precision copy of W (early in training ``|g − 1|`` is below bf16's resolution).
The norm is detached (DoRA paper §4.3, PEFT's ``weight_norm.detach()``).
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F

from ..reference import (DORA_DROPOUT_MODES, dora_linear_ref, dropout_threshold, keep_mask_stream, lora_dropout_ref,
                         lora_dropout_stream, use_cpu_stream)
from .common import _bucket, held, kept_state, recorded_grads, returned, scaled_mm

BACKENDS = ("reference", "triton")
# The factored norm is trusted where ‖W_j + sB_jA‖² >= CANCEL_RATIO · (‖W_j‖² + |cross_j| + quad_j): its fp32
# rounding error, relative to the sum of the terms' sizes, is then amplified at most 4x in n². Rows below
# (sBA ≈ −W) are summed again exactly over W's tiles.
CANCEL_RATIO = 0.25
_ROWS_PER_CHUNK = 128  # bounds the fp32 temporaries of the reference norm to 128 x in


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def weight_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_j‖²`` (out,) in fp32 (fp64 for fp64 W), read in row chunks (no fp32 copy of W). W is frozen:
    a layer computes this once and passes it as ``weight_sq_norm`` (recomputing when W's version changes)."""
    dt = _acc_dtype(weight.dtype)
    out = weight.new_empty(weight.shape[0], dtype=dt)
    with torch.no_grad():
        for i in range(0, weight.shape[0], _ROWS_PER_CHUNK):
            out[i:i + _ROWS_PER_CHUNK] = torch.linalg.vector_norm(weight[i:i + _ROWS_PER_CHUNK], dim=1, dtype=dt)
        out.square_()
    return out


def _tiled_sq_norm(w_rows: torch.Tensor, a: torch.Tensor, b_rows: torch.Tensor, scaling: float,
                   block_k: int = 512) -> torch.Tensor:
    """Exact ``‖W_j + s B_j A‖²`` of the given rows, one pass over W's column tiles in a's dtype."""
    acc = w_rows.new_zeros(w_rows.shape[0], dtype=a.dtype)
    for k0 in range(0, w_rows.shape[1], block_k):
        t = torch.addmm(w_rows[:, k0:k0 + block_k].to(a.dtype), b_rows, a[:, k0:k0 + block_k], alpha=scaling)
        acc = acc + t.square().sum(1)  # not in place: under vmap A and B may be batched and W not
    return acc


def dora_norm_factored(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                       weight_sq_norm: torch.Tensor | None = None) -> tuple:
    """``(n, fallback_rows)``: ``n_j = ‖W_j + s B_j A‖₂`` (out,) fp32 (fp64 for fp64 W) from
    ``‖W_j‖² + 2s (W Aᵀ)_j·B_j + s² B_j (A Aᵀ) B_jᵀ`` (W Aᵀ (out, r) and A Aᵀ (r, r) in fp32), and the
    LongTensor of the rows where that sum cancelled (see CANCEL_RATIO) and was replaced by the exact
    tiled sum (None while compiling: there ``torch.cond`` sums every row again, only when one cancelled). No
    (out, in) temporary: W is read in row chunks."""
    dt = _acc_dtype(weight.dtype)
    with torch.no_grad():
        a = lora_A.detach().to(dt)
        b = lora_B.detach().to(dt)
        w2 = weight_sq_norms(weight) if weight_sq_norm is None else weight_sq_norm.to(dt)
        wa = b.new_empty(b.shape)
        # One matmul when W is already in dt (no temporary); else chunks of about 4M elements cast to dt (a
        # bounded fp32 copy). 128-row chunks cost 47 ms of op overhead per call at 1024x1024 on 2 busy CPU threads.
        step = weight.shape[0] if weight.dtype == dt else max(_ROWS_PER_CHUNK, (1 << 22) // max(1, weight.shape[1]))
        for i in range(0, weight.shape[0], step):
            wa[i:i + step] = weight[i:i + step].to(dt) @ a.t()
        cross = (2.0 * scaling) * (wa * b).sum(1)
        quad = (scaling * scaling) * ((b @ (a @ a.t())) * b).sum(1)
        n2 = w2 + cross + quad
        bad = n2 <= CANCEL_RATIO * (w2 + cross.abs() + quad)
        if torch.compiler.is_compiling():  # no host sync in a graph (nonzero would break it): a traced branch
            def exact(n2, bad, weight, a, b):  # every row summed again, kept where it cancelled
                return torch.where(bad, _tiled_sq_norm(weight, a, b, scaling), n2)

            if torch._C._are_functorch_transforms_active():  # compiling func.grad(...): cond has no rule there
                n2 = exact(n2, bad, weight, a, b)
            else:
                n2 = torch.cond(bad.any(), exact, lambda n2, bad, weight, a, b: n2.clone(), (n2, bad, weight, a, b))
            return n2.clamp_min(0.0).sqrt(), None
        rows = bad.nonzero().squeeze(1)
        if rows.numel():
            n2[rows] = _tiled_sq_norm(weight[rows], a, b[rows], scaling)
        return n2.clamp_min(0.0).sqrt(), rows


def dora_norm(weight, lora_A, lora_B, scaling, weight_sq_norm=None, backend="reference") -> torch.Tensor:
    """``‖W_j + s B_j A‖₂`` (out,), detached, fp32 (fp64 for fp64 W on the reference path). ``"triton"``:
    the one-pass tiled kernel (exact; reads W once, as the factored form would); ``"reference"``: the
    factored form with its exact fallback (``dora_norm_factored``)."""
    if backend == "triton":
        K, _ = _kernels()
        return K.norm_op(weight.detach(), lora_A.detach(), lora_B.detach(), float(scaling))
    return dora_norm_factored(weight, lora_A, lora_B, scaling, weight_sq_norm)[0]


_kernel_modules = None


def _kernels() -> tuple:
    """``(kernels.dora, kernels.lora)``, imported at the first triton call (they import triton) and kept: the
    two import statements cost 1.5 µs a call."""
    global _kernel_modules
    if _kernel_modules is None:
        from ..kernels import dora as K
        from ..kernels import lora as KL

        _kernel_modules = (K, KL)
    return _kernel_modules


class DoRALinearFunction(torch.autograd.Function):
    r"""DoRA linear on 2-D x (M, K), on the kernels (``impl="triton"``) or plain PyTorch (``"reference"``).

    Notation: s the scaling, p the dropout rate, D the keep-mask of x (M, K) (a pure function of the seed,
    redrawn, never stored), x̃ = drop(x) = D ⊙ x / (1 − p) (x̃ = x without dropout), n (N,) the detached
    norm ‖W + sBA‖_row, g = m / n, u = x̃ Aᵀ (M, r). Column scales broadcast over rows: (dY ⊙ g)_ij =
    dY_ij g_j.

    Forward:
      plain (eval, p = 0, or dropout_mode="lora_only"):
          z = x Wᵀ + s u Bᵀ,          y = g ⊙ z + b                     one GEMM, g and b in its epilogue
      exact (PEFT 0.21's training formula with dropout: the base output on x, the DoRA term on x̃):
          z = x̃ Wᵀ + s u Bᵀ,          y = x Wᵀ + (g − 1) ⊙ (x̃ Wᵀ) + g ⊙ (s u Bᵀ) + b
                                        = (x − x̃) Wᵀ + g ⊙ z + b           one GEMM loop, two accumulators

    Backward, from dY (M, N), with G = dY ⊙ g and v = G B (M, r). n is a constant (detached), so
    ∂y_ij/∂m_j = z_ij / n_j, and y depends on A, B only through s g ⊙ (u Bᵀ):
      dB = s Gᵀ u = s diag(g) dYᵀ u                                                   (N, r)
      dL/du = s G B = s v;  u = x̃ Aᵀ  =>  dA = s vᵀ x̃                                (r, K)
      dm_j = Σ_i dY_ij z_ij / n_j                                                     (N,)
        plain: z = (y − b) / g, so dm_j = Σ_i dY_ij (y_ij − b_j) / m_j: one pass over dY and the saved y
               gives v and dm (kernel ``_dora_dy_kernel``); a column with m_j = 0 has its z recomputed.
        exact: z = x̃ Wᵀ + s u Bᵀ is not recoverable from y; recomputed tile by tile and reduced against dY
               in the GEMM's epilogue (``DM_EXACT``: one more GEMM, no (M, N) store).
      dX: x enters through x Wᵀ (plain: scaled by g; exact: unscaled and, through x̃, scaled by g − 1) and
          through u (∂u/∂x = D Aᵀ/(1 − p)):
        plain:  dX = G W + s D ⊙ (v A) / (1 − p)                  (D = 1 without dropout)
        exact:  dX = dY W + D ⊙ ((dY ⊙ (g − 1)) W + s v A) / (1 − p)
      dW = Gᵀ x (plain), dYᵀ x + (dY ⊙ (g − 1))ᵀ x̃ (exact); db = Σ_i dY_i    (only when they require grad)

    Saved: x, u (M, r), the parameters, n and g (N,), and (plain) the output y, which the caller holds
    anyway in a training graph: no extra (M, N) or (N, K) tensor. (In eager mode without saved-tensor hooks, y is
    held through an alias that shares its version counter, not saved, and dropped by the backward: where the caller
    changed the output in place before backward, as ``nn.ReLU(inplace=True)`` or ``h += r`` do, or in a second
    backward, dm comes from z recomputed from x, one GEMM more. Under saved-tensor hooks (activation checkpointing,
    save_on_cpu) a copy of y is saved: transient under checkpointing, which recomputes it.)
    x̃ is recomputed from the seed. The PyTorch path in the exact mode (training with dropout), where m needs a
    gradient, saves z (M, N) instead, as PEFT's autograd keeps x̃ Wᵀ: one GEMM fewer in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, exact, impl):
        g = _gain(magnitude, norm, x.dtype, impl)
        p = dropout_p
        thr = dropout_threshold(p) if p > 0.0 else 0
        ds = 1.0 / (1.0 - p) if p > 0.0 else 1.0
        # The PyTorch path in the exact mode keeps z for dm (as PEFT's autograd keeps x̃ Wᵀ): one (M, N) tensor
        # instead of one more GEMM in backward
        keep_z = impl != "triton" and exact and ctx.needs_input_grad[5]
        y, u, z = _forward(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, thr, ds, exact, impl, keep_z)
        saved = z if exact else (y if ctx.needs_input_grad[5] else None)  # (plain: y serves dm only)
        if not exact and saved is not None and not torch.compiler.is_compiling():
            # The caller may change the output in place (ReLU(inplace=True), h += r), as nn.Linear's allows.
            if torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
                # y held through an alias sharing its version counter, not saved: where it moved, the backward
                # recomputes z from x
                ctx.y_alias, ctx.y_version, saved = y.detach(), y._version, None
            else:
                # saved-tensor hooks (activation checkpointing, save_on_cpu) must see every saved tensor, and a
                # non-reentrant checkpoint's recomputation is not version-checked (a changed y gave a silently wrong
                # dm): a copy of its own, made before anything changes y (transient under checkpointing)
                saved = y.clone()
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, norm, g, u, saved)
        ctx.scaling, ctx.p, ctx.seed, ctx.thr, ctx.ds, ctx.exact, ctx.impl = scaling, p, seed, thr, ds, exact, impl
        ctx.cpu_stream = use_cpu_stream(x)  # the mask's stream, as _forward drew it: the backward redraws that one
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_A, lora_B, magnitude, norm, g, u, y = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        s, p, seed, thr, ds, exact = ctx.scaling, ctx.p, ctx.seed, ctx.thr, ctx.ds, ctx.exact
        if torch.is_grad_enabled():  # create_graph: gradients that second derivatives can go through
            return _recorded_backward(ctx, dy, x, weight, bias, lora_A, lora_B, magnitude, norm)
        alias = getattr(ctx, "y_alias", None)  # (set by an eager forward only)
        if alias is not None:  # None where the output changed in place since: dm from z recomputed
            ctx.y_alias = None  # dropped: y's memory is free after backward (a second one recomputes z)
            y = alias if alias._version == ctx.y_version else None
        elif getattr(ctx, "y_version", None) is not None:  # a retain_graph second backward
            y = None
        lost_y = not exact and need_m and y is None
        dt = g.dtype
        dy = dy.contiguous() if dy.stride(-1) != 1 and dy.stride(0) != 1 else dy
        dx = dw = db = da = dbb = dm = None
        xd = None
        if ctx.impl == "triton":
            K, KL = _kernels()
            k = x.shape[1]
            if exact:
                v, _ = K.dy_pass_op(dy, None, g, None, lora_B)
                if need_m:
                    part = K.gemm_op(K.DM_EXACT, x, weight.t(), u, lora_B.t(), g, None, s, seed, thr, ds, dy)
                    dm = part.sum(0) / norm
                if need_x:
                    dx = K.gemm_op(K.DX_EXACT, dy, weight, v, lora_A, g, None, s, seed, thr, ds)
            else:
                v, dmsum, dx, dbb = _plain_dy_side(dy, weight, bias, lora_A, lora_B, g, u, y, s, seed, thr, ds,
                                                   need_x, need_m and not lost_y, need_bb)
                if lost_y:
                    dm = _dm_recomputed(dy, x, weight, lora_B, u, norm, s, dt)
                elif need_m:  # (with a bias, one more pass over y finds the columns where y − b cancels)
                    y_sq = _col_dots(None, y, bias, dt)[1] if bias is not None else None
                    dm = _fix_lost_columns(dmsum / magnitude.detach().to(dt), dy, x, weight, bias, lora_B, u,
                                           magnitude, norm, s, y_sq)
            if need_bb and dbb is None:
                dbb = KL.shrink_op(dy.t(), u, s, 0, 0, 0, 0) * g[:, None]
            if need_a:
                da = KL.shrink_op(x.t(), v, s * ds, seed, thr, 1, k).t()
            if need_w:
                xd = lora_dropout_ref(x, p, seed) if exact else None
        else:
            gdy = (dy.to(dt) * g).to(dy.dtype)  # G, rounded to dY's dtype as the kernels round it
            v = gdy @ lora_B.to(dy.dtype)
            keep = keep_mask_stream(x, p, seed, ctx.cpu_stream) if p > 0.0 else None  # once for x̃ and dX
            xd = x * keep.to(x.dtype) * ds if keep is not None else x
            if exact:
                if need_m:  # z saved by the forward (y holds it in the exact mode)
                    z = y if y is not None else torch.addmm(F.linear(xd, weight), u, lora_B.t(), alpha=s)
                    dm = (dy.to(dt) * z.to(dt)).sum(0) / norm
                if need_x:
                    inner = torch.addmm((dy.to(dt) * (g - 1.0)).to(dy.dtype) @ weight, v, lora_A, alpha=s)
                    dx = (dy @ weight).add_(inner.mul_(keep).mul_(ds) if keep is not None else inner)
            else:
                if lost_y:
                    dm = _dm_recomputed(dy, x, weight, lora_B, u, norm, s, dt)
                elif need_m:
                    dots, y_sq = _col_dots(dy, y, bias, dt)
                    dm = _fix_lost_columns(dots / magnitude.detach().to(dt), dy, x, weight, bias, lora_B, u,
                                           magnitude, norm, s, y_sq)
                if need_x:
                    low = scaled_mm(v, lora_A, s)
                    dx = (low.mul_(keep).mul_(ds) if keep is not None else low).addmm_(gdy, weight)  # in place
            # s as the products' alpha (ops.common.scaled_mm): an unscaled fp16 dB / s, dA / s can overflow
            if need_bb:
                dbb = scaled_mm(gdy.t(), u.to(dy.dtype), s)
            if need_a:
                da = scaled_mm(v.t(), xd, s)
        if need_w:
            if exact:
                dw = dy.t() @ x + (dy.to(dt) * (g - 1.0)).to(dy.dtype).t() @ xd
            else:
                dw = (dy.to(dt) * g).to(dy.dtype).t() @ x
        if need_b and bias is not None:
            db = dy.sum(0)

        def cast(t, like):
            return None if t is None else t.to(like.dtype)

        return (cast(dx, x), cast(dw, weight), cast(db, bias) if bias is not None else None, cast(da, lora_A),
                cast(dbb, lora_B), cast(dm, magnitude), None, None, None, None, None, None)


def _recorded_backward(ctx, dy, x, weight, bias, lora_A, lora_B, magnitude, norm) -> tuple:
    """``DoRALinearFunction``'s gradients under ``create_graph``: autograd through the forward's formula recomputed
    by recorded ops from the saved inputs (the same mask, n the detached norm), so that second derivatives see how
    the gradients depend on x, A, B and m. The fast backward's saved u and g carry no graph: through them second
    derivatives would be silently wrong. Double backward only: it forms the (M, K) x̃ and the (M, N) products."""
    s, p, seed, exact = ctx.scaling, ctx.p, ctx.seed, ctx.exact
    xd = x if p == 0.0 else x * keep_mask_stream(x, p, seed, ctx.cpu_stream).to(x.dtype) * ctx.ds
    g = (magnitude / norm.detach()).to(x.dtype)
    low = s * ((xd @ lora_A.t()) @ lora_B.t())
    if exact:  # y = x Wᵀ + (g − 1) ⊙ (x̃ Wᵀ) + g ⊙ (s x̃ Aᵀ Bᵀ) + b
        out = x @ weight.t() + (g - 1.0) * (xd @ weight.t()) + g * low
    else:  # y = g ⊙ (x Wᵀ + s x̃ Aᵀ Bᵀ) + b
        out = g * (x @ weight.t() + low)
    if bias is not None:
        out = out + bias
    return recorded_grads(out, (x, weight, bias, lora_A, lora_B, magnitude), ctx.needs_input_grad[:6], dy, 6)


def _gain(magnitude, norm, x_dtype, impl) -> torch.Tensor:
    """g = m / n (N,), fp32 on the kernels, else in x's accumulation dtype."""
    dt = torch.float32 if impl == "triton" else _acc_dtype(x_dtype)
    return magnitude.detach().to(dt) / norm.to(dt)


_path_cache: dict = {}  # shape key -> "kernels" or "tma-shrink" / "tma-dy" (the plain mode on the kernels)


def _plain_dy_side(dy, weight, bias, lora_A, lora_B, g, u, y, s, seed, thr, ds, need_x, need_m, need_bb) -> tuple:
    """``(v, dmsum, dX, dB)`` of the plain backward on the kernels (dX, dmsum, dB None when not needed; dB also
    None where the caller computes it): the DoRA dY pass (v, dmsum) and the DX GEMM, or, where LoRA's backward
    offers it (sm_90+, dX needed, from ``ops.lora.FUSED_SHRINK_MIN_ROWS`` rows; ranks up to 16 without
    dropout's mask; with dm, in_features above 256), the faster (timed once per shape) of that and
    ``kernels.lora_tma.dora_backward_tma``: dX, v, dB and dmsum from one kernel over dY (G = dY ⊙ g formed in
    registers). FASTPEFT_LORA_GEMM=tma-shrink forces the latter where it can run."""
    K, KL = _kernels()

    def kernels():
        v, dmsum = K.dy_pass_op(dy, y if need_m else None, g, bias, lora_B)
        dx = K.gemm_op(K.DX, dy, weight, v, lora_A, g, None, s * ds, seed, thr, 1.0) if need_x else None
        return v, dmsum, dx, None

    from ..kernels import lora_tma as KT
    from . import lora as OL  # imports the kernels: only on the triton path
    if (not need_x or not OL._fused_dy_offered(dy, weight, lora_B, thr > 0)
            or not KT.dora_dy_pass_fits(lora_B.shape[1], thr > 0, KT.fits_itemsize(dy), dm_part=need_m)
            or need_m and not KT.dm_pass_fits(dy, weight.shape[1])):
        return kernels()

    def tma_dy():
        dx, v, db, dmsum = KT.dora_backward_tma(dy=dy, w=weight, lora_A=lora_A, lora_B=lora_B, g=g,
                                                u=u if need_bb else None, y=y if need_m else None, bias=bias,
                                                scale=s * ds, seed=seed, threshold=thr)
        return v, dmsum, dx, db.mul_(s) if need_bb else None
    key = ("bwd", _bucket(dy.shape[0]), weight.shape[1], dy.shape[1], lora_A.shape[0], dy.dtype, bias is not None,
           thr > 0, need_m, need_bb)
    # FASTPEFT_LORA_GEMM: "tma-shrink" forces the fused path, "auto" times, the others keep the kernels
    mode = {"tma-shrink": "tma-dy", "auto": "auto"}.get(KL.gemm_mode(), "kernels")
    run = {"kernels": kernels, "tma-dy": tma_dy}
    return run[KL.timed_choice(_path_cache, key, mode, dy.device, run, "kernels")]()


def _fwd_kernels(x, weight, bias, lora_A, lora_B, g, scaling, seed, thr, ds, exact) -> tuple:
    K, KL = _kernels()
    u = KL.shrink_op(x, lora_A.t(), ds, seed, thr, x.shape[1], 1)
    return K.gemm_op(K.FWD_EXACT if exact else K.FWD, x, weight.t(), u, lora_B.t(), g, bias, scaling, seed, thr, ds), u


def _fwd_tma_shrink(x, weight, bias, lora_A, lora_B, g, scaling, seed, thr, ds, exact) -> tuple:
    from ..kernels import lora_tma as KT
    return KT.lora_forward_tma(x=x, w_t=weight.t(), lora_A=lora_A, lv=lora_B.t(), bias=bias, scale=scaling,
                               drop_scale=ds, seed=seed, threshold=thr, col_scale=g)


def _fwd_decode(x, weight, bias, lora_A, lora_B, g, scaling, seed, thr, ds, exact) -> tuple:
    from ..kernels import quant as KQ
    return KQ.lora_decode(x, weight, lora_A, lora_B, bias, scaling, ds, seed, thr, col_scale=g)


# The plain forward's compositions on the kernels (the exact mode runs the first only).
_DORA_FORWARDS = {"kernels": _fwd_kernels, "tma-shrink": _fwd_tma_shrink, "decode": _fwd_decode}


def _forward(x, weight, bias, lora_A, lora_B, g, scaling, p, seed, thr, ds, exact, impl, keep_z=False) -> tuple:
    """``(y, u, z)`` of ``DoRALinearFunction``'s forward (z, the PyTorch path's x̃ Wᵀ + s u Bᵀ, only with
    ``keep_z`` in the exact mode, else None), g = m / n given (see there). The plain forward on the
    kernels is the shrink and ``_dora_gemm_kernel``, or, where LoRA's forward offers them, the fastest (timed
    once per shape) of that, the TMA GEMM with the shrink fused and g in its epilogue (sm_90+, from
    ``ops.lora.FUSED_SHRINK_MIN_ROWS`` rows, ranks up to 64; ``kernels.lora_tma.lora_forward_tma``) and, up to
    ``kernels.quant.DENSE_MAX_M`` rows, the one-launch decode kernel with g in its epilogue
    (``kernels.quant.lora_decode``); FASTPEFT_LORA_GEMM=tma-shrink / decode forces one where it can run."""
    if impl == "triton":
        K, KL = _kernels()
        args = (x, weight, bias, lora_A, lora_B, g, scaling, seed, thr, ds, exact)
        if exact:  # the kernels alone offer the exact mode's two GEMMs
            return (*_fwd_kernels(*args), None)
        key = ("fwd", _bucket(x.shape[0]), x.shape[1], weight.shape[0], lora_A.shape[0], x.dtype, bias is not None,
               thr > 0)
        # FASTPEFT_LORA_GEMM: "tma-shrink" / "decode" force those paths where offered, "auto" times, the others
        # (and a forced path not offered here) keep the kernels. A settled choice every call can run (the kernels,
        # decode) needs no candidates: a decode step's host time (as ops.lora's forward)
        mode = KL.gemm_mode()
        name = None
        if mode == "auto":
            name = KL.settled_choice(_path_cache, key, x.device, "kernels", "kernels")
            name = name if name in ("kernels", "decode") else None
        elif mode not in ("tma-shrink", "decode"):
            name = "kernels"
        if name is None:
            from . import lora as OL  # imports the kernels: only on the triton path
            run = {"kernels": functools.partial(_fwd_kernels, *args)}
            if OL._fused_shrink_offered(x, weight, lora_A):
                run["tma-shrink"] = functools.partial(_fwd_tma_shrink, *args)
            if OL._decode_offered(x.shape[0]):
                run["decode"] = functools.partial(_fwd_decode, *args)
            name = "kernels" if len(run) == 1 else KL.timed_choice(
                _path_cache, key, mode if mode == "auto" or mode in run else "kernels", x.device, run, "kernels")
        return (*_DORA_FORWARDS[name](*args), None)
    dt = g.dtype
    # the CPU stream on the CPU path (SplitMix64, as plain LoRA's: the Philox stream in PyTorch's int64 ops
    # costs more than the GEMMs), the kernels' Philox stream elsewhere
    xd = lora_dropout_stream(x, p, seed) if p > 0.0 else x
    u = F.linear(xd, lora_A)
    z = F.linear(xd if exact else x, weight)
    # in place: no (M, N) copy; not while compiling, where a kept z made in place aliases the graph's intermediate
    # (dynamo: "an intermediate tensor ... aliases an input or output")
    z = torch.addmm(z, u, lora_B.t(), alpha=scaling) if keep_z and torch.compiler.is_compiling() else \
        z.addmm_(u, lora_B.t(), alpha=scaling)
    if keep_z:  # the backward's dm reads z (the exact mode with dropout: not recoverable from y)
        y = g * z.to(dt)
    else:
        y = z.mul_(g) if z.dtype == dt else g * z.to(dt)  # in place: z is not needed again
        z = None
    if exact:
        y += F.linear(x - xd, weight).to(dt)
    if bias is not None:
        y += bias.to(dt)
    return y.to(x.dtype), u, z


def _cached_gain(norm_cache: dict, weight, lora_A, lora_B, magnitude, scaling: float, weight_sq_norm, x_dtype,
                 backend: str) -> torch.Tensor:
    """g = m / ‖W + sBA‖_row for a call with nothing to differentiate, kept in ``norm_cache["gain"]`` with
    what it was computed from: W, A, B and m (identity, storage, version, dtype, device, shape; a write through
    ``.data`` is not seen, as for the layers' other caches), the scaling, the backend and the dtype it is in.
    The norm reads all of W (a kernel on the triton path, as long as the forward's GEMM at decode sizes)."""
    objs = (weight, lora_A, lora_B, magnitude)
    state = kept_state(objs) + (scaling, backend, x_dtype)
    cached = norm_cache.get("gain")
    if cached is None or cached[1] != state or not all(map(operator.is_, objs, cached[0])):
        norm = dora_norm(weight, lora_A, lora_B, scaling, weight_sq_norm, backend)
        cached = norm_cache["gain"] = (objs, state, _gain(magnitude, norm, x_dtype, backend), held(objs))
    return cached[2]


def _col_dots(dy, y, bias, dt, elems=1 << 22) -> tuple:
    """``(Σ_i dY_ij (y_ij − b_j), Σ_i (y_ij − b_j)²)`` (N,) each in dt (the first None without ``dy``), in row
    chunks of about ``elems`` elements: a bounded temporary. Chunks this large, not 256 rows: each op pays a fixed
    thread-pool cost on a busy CPU (256-row chunks took 385 ms at M=2048, N=1024 on 2 shared threads, one
    4M-element chunk 48 ms)."""
    rows = max(1, elems // max(1, y.shape[1]))
    dots = None if dy is None else y.new_zeros(y.shape[1], dtype=dt)
    squares = y.new_zeros(y.shape[1], dtype=dt)
    b = bias.to(dt) if bias is not None else 0.0
    for i in range(0, y.shape[0], rows):
        z = y[i:i + rows].to(dt) - b
        if dots is not None:
            dots += (dy[i:i + rows].to(dt) * z).sum(0)
        squares += z.square().sum(0)
    return dots, squares


def _fix_lost_columns(dm, dy, x, weight, bias, lora_B, u, magnitude, norm, s, y_sq=None):
    """dm from ``Σ dY (y − b) / m`` is as exact as y − b holds g z. Recomputed from z_j = x W_jᵀ + s u B_jᵀ,
    for the columns where it does not: m_j = 0 (g_j = 0 erased z_j from y: 0/0), g_j below the square root of the
    smallest normal number of y's dtype (g z underflows there); and, given ``y_sq`` = Σ_i (y_ij −
    b_j)², where y − b is 0 in the whole column (g_j z_j below y's rounding: dm stuck at 0) or the bias exceeds the
    column's rms of y − b (y − b cancels: z_j's error grows as |b_j| / |g_j z_j| ulps of y, 100x PEFT's, which keeps
    z, at 500x). A host sync to find them; in most layers none (m starts at ‖W_j‖ > 0, biases are small next to the
    outputs)."""
    m = magnitude.detach()  # g_j below sqrt(tiny) of y's dtype (fp16: 0.0078): z near underflow in y; no pass over y
    lost = (m == 0) | (m.abs() < norm * torch.finfo(dy.dtype).tiny ** 0.5)
    if y_sq is not None:
        lost = lost | (y_sq == 0)
        if bias is not None:
            lost = lost | (bias.detach().to(y_sq.dtype).square() * max(1, dy.shape[0]) > y_sq)
    if torch.compiler.is_compiling():  # as dora_norm_factored: a traced branch, every column, kept where lost
        def fix(dm, dy, x, weight, lora_B, u, lost, norm):
            return torch.where(lost, _dm_recomputed(dy, x, weight, lora_B, u, norm, s, dm.dtype), dm)

        return torch.cond(lost.any(), fix, lambda dm, *rest: dm.clone(), (dm, dy, x, weight, lora_B, u, lost, norm))
    cols = lost.nonzero().squeeze(1)
    if cols.numel():
        dm[cols] = _dm_recomputed(dy[:, cols], x, weight[cols], lora_B[cols], u, norm[cols], s, dm.dtype)
    return dm


def _dm_recomputed(dy, x, weight, lora_B, u, norm, s, dt) -> torch.Tensor:
    """dm_j = Σ_i dY_ij z_ij / n_j with z = x Wᵀ + s u Bᵀ recomputed from x (one more GEMM: the columns of ``weight``
    / ``lora_B`` given), in dt."""
    z = torch.addmm(F.linear(x, weight), u.to(x.dtype), lora_B.t().to(x.dtype), alpha=s)
    return (dy.to(dt) * z.to(dt)).sum(0) / norm.to(dt)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True, seed=None,
                dropout_mode="exact", weight_sq_norm=None, backend="reference", norm_cache=None) -> torch.Tensor:
    """DoRA linear ``y = (m / ‖W + sBA‖_row) ⊙ (x Wᵀ + s drop(x) Aᵀ Bᵀ) + b`` (see ``DoRALinearFunction``
    for the exact dropout formula and every gradient).

    x: (..., in), any strides; weight: (out, in); bias: (out,) or None; lora_A: (r, in); lora_B: (out, r);
    magnitude: (out,) (PEFT's ``lora_magnitude_vector``). ``dropout_mode``: ``"exact"`` (PEFT's training
    semantics with dropout) or ``"lora_only"`` (opt-in: dropout on the LoRA branch only, one GEMM; eval is
    the same in both). ``weight_sq_norm``: the cached ``weight_sq_norms(weight)`` (reference path).
    ``backend``: ``"reference"`` or ``"triton"``, already resolved (``fastpeft.functional`` resolves
    ``"auto"``). Differentiable in x, lora_A, lora_B, magnitude, and bias / weight where they require grad.
    A call with nothing to differentiate (decode, eval) runs the forward without the autograd Function and, given
    ``norm_cache`` (a dict the caller keeps), reuses the norm while W, A, B, m are unchanged (``_cached_gain``).
    """
    if dropout_mode not in DORA_DROPOUT_MODES:
        raise ValueError(f"dropout_mode must be one of {DORA_DROPOUT_MODES}, got {dropout_mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} here, got {backend!r}")
    n_out, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim must be in_features={k}, got {x.shape[-1]}")
    if magnitude.shape != (n_out,):
        raise ValueError(f"magnitude must have shape ({n_out},), got {tuple(magnitude.shape)}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # a 2-D x as it is: both paths take any strides
    scaling = float(scaling)
    exact = p > 0.0 and dropout_mode == "exact"
    seed = 0 if seed is None else seed
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap, ...), compiled or not: the autograd composition (its Function defines no
        # setup_context / vmap rule; compiled under func.grad its dm came out 0) with the same mask, the norm summed
        # exactly over W's tiles (no host sync: nonzero cannot run there)
        dt = _acc_dtype(weight.dtype)
        with torch.no_grad():
            norm = _tiled_sq_norm(weight.detach(), lora_A.detach().to(dt), lora_B.detach().to(dt), scaling).sqrt()
        y = dora_linear_ref(x2, weight, bias, lora_A, lora_B, magnitude, scaling, p, training, seed, dropout_mode,
                            norm=norm)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                         for t in (x, weight, bias, lora_A, lora_B, magnitude)):
        norm = dora_norm(weight, lora_A, lora_B, scaling, weight_sq_norm, backend)
        y = DoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p, seed, exact,
                                     backend)
    else:  # nothing to differentiate: no autograd Function, nothing saved
        if norm_cache is not None and not torch.compiler.is_compiling():
            g = _cached_gain(norm_cache, weight, lora_A, lora_B, magnitude, scaling, weight_sq_norm, x.dtype, backend)
        else:
            g = _gain(magnitude, dora_norm(weight, lora_A, lora_B, scaling, weight_sq_norm, backend), x.dtype, backend)
        thr = dropout_threshold(p) if p > 0.0 else 0
        ds = 1.0 / (1.0 - p) if p > 0.0 else 1.0
        y = _forward(x2, weight, bias, lora_A, lora_B, g, scaling, p, seed, thr, ds, exact, backend)[0]
    return y if x2 is x else y.view(*x.shape[:-1], n_out)
