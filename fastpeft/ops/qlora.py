"""LoRA over a quantized (bitsandbytes 4-bit / 8-bit) base weight: the autograd Function and its glue.

``fastpeft.functional.qlora_linear(x, qweight, bias, lora_A, lora_B, scaling, ...)`` is ``lora_linear`` with the
frozen weight given as a ``fastpeft.quant.QuantizedWeight`` (the packed bnb weight read in place), run here by
``qlora_linear_op``. The weight is dequantized per call and never kept: forward and backward each dequantize it
again, into the shared ``fastpeft.quant.workspace`` (per device; on the CPU per thread), which no call outlives:
on the triton path, and on the PyTorch path on the CPU unless autograd saves W (``fastpeft.quant.call_buffer``).

Dtypes follow bitsandbytes' Linear4bit: x, bias, lora_A and lora_B are cast to the layer's compute dtype
(``qweight.compute_dtype_for(x)``), the output back to x's dtype; gradients flow back through those casts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import INT8_INV_SCALE, QuantizedWeight, call_buffer, dequantize_weight, weight_workspace
from ..reference import (dropout_threshold, func_transforms_active, keep_mask_stream, lora_linear_ref,
                         use_cpu_stream)
from .common import autocast_enabled, no_second_derivatives, returned

PATHS = ("auto", "fused", "dequant")
_path_cache: dict = {}


def _reference_weight(qw: QuantizedWeight, dtype: torch.dtype, saved: bool = False,
                      scaled: bool = True) -> torch.Tensor:
    """W (N, K) in ``dtype`` for the PyTorch path, where ``call_buffer`` puts it (on the CPU the shared workspace,
    valid until the next layer's call, unless autograd will save W: ``saved``). 4-bit: ``dequantize_weight``.
    int8: as bitsandbytes' CPU training matmul (``MatMul8bitFp``, what PEFT's ``Linear8bitLt`` runs) forms it,
    forward and backward: ``C.to(dtype) * (SCB / 127)``, one pass fewer than ``int8_vectorwise_dequant``'s
    ``C * SCB / 127`` (``dequantize_ref``'s, which differs from it by rounding only); the cast into the workspace
    is the same exact conversion as ``.to(dtype)``. ``scaled=False`` (int8 only): C cast, without its row scales
    (``_int8_scales``), for the caller to put them on the (M, N) side."""
    out = call_buffer(qw, dtype, saved)
    if qw.kind == "int8":
        w = qw.data.to(dtype) if out is None else out.view(qw.shape).copy_(qw.data)
        return w.mul_(_int8_scales(qw).unsqueeze(1)) if scaled else w
    return dequantize_weight(qw, dtype, out=out)


def _int8_scales(qw: QuantizedWeight) -> torch.Tensor:
    """c = SCB / 127 (N,) fp32, the int8 weight's row scales: W = diag(c) C (bitsandbytes' 1/127)."""
    return qw.scales.float() * INT8_INV_SCALE


def _scales_on_rows(qw: QuantizedWeight, m: int, dtype: torch.dtype) -> bool:
    """Whether the PyTorch path puts int8's row scales c on the (M, N) side, ``x Wᵀ = (x Cᵀ) diag(c)`` and
    ``dY W = (dY diag(c)) C``, instead of on W (N, K): a pass over M·N elements instead of N·K, so when M < K
    (decode, short batches; 1024², M = 1 or 16, fp32, 2 threads: forward + backward 4-6 % faster, interleaved
    runs). Equal to bitsandbytes' order (the scales on W) to rounding, not bit for bit. Not in fp16: x Cᵀ is y / c
    (c ~ 5e-4 for weights of std 0.02, so ~2000 y: inf from |y| ~ 30) and dY ⊙ c falls below fp16's normal range
    (dX 7 % off); bf16 and fp32 have fp32's exponent range."""
    return qw.kind == "int8" and m < qw.shape[1] and dtype != torch.float16


def _reference_forward(x, lora_A, lora_B, bias, qw, scaling: float, p: float, seed: int):
    """``(y, u)`` of the PyTorch path: ``y = x Wᵀ + b + s (drop(x) Aᵀ) Bᵀ``, ``u = drop(x) Aᵀ`` (M, r) fp32.

    W is dequantized for this call (``_reference_weight``: on the CPU into the shared workspace), no longer
    needed once x Wᵀ + b is formed; the LoRA term is added in place. The operations and their order are
    PEFT's bnb layers' on the CPU in training (bnb's ``F.linear(x, deq(W), b)``, then
    ``result + lora_B(lora_A(x)) * s``), so in fp32 the output is PEFT's bit for bit (tested; int8 where M ≥ K,
    to rounding below: ``_scales_on_rows``)."""
    if _scales_on_rows(qw, x.shape[0], x.dtype):  # int8, M < K: (x Cᵀ) diag(c) + b
        y = F.linear(x, _reference_weight(qw, x.dtype, scaled=False))
        y.mul_(_int8_scales(qw))  # fp32 c as on W; in place, y's dtype kept
        if bias is not None:
            y += bias
    else:
        w = _reference_weight(qw, x.dtype)
        y = F.linear(x, w, bias)
        del w
    if p > 0.0:
        # the CPU stream on the CPU path (as plain LoRA's: the Philox stream in PyTorch's int64 ops costs more than
        # the matmuls), the kernels' Philox stream elsewhere; 1/(1-p) on u (M, r), not on the dropped x (M, K)
        u = (x * keep_mask_stream(x, p, seed)).float() @ lora_A.float().t()
        u.mul_(1.0 / (1.0 - p))
    else:
        u = x.float() @ lora_A.float().t()
    low = u.to(x.dtype) @ lora_B.t()
    low.mul_(scaling)
    y += low
    return y, u


class QLoRALinearFunction(torch.autograd.Function):
    r"""LoRA over a quantized frozen weight W (N, K); x is 2-D here, (M, K), in the compute dtype.

    With s the scaling, p the dropout rate, D the keep-mask of x (M, K) (``keep_mask_stream``: the kernels' Philox stream of
    ``fastpeft.reference.dropout_mask`` for ``seed``, the CPU stream on the CPU path) and drop(x) = D ⊙ x / (1 - p):

        W = deq(Wq)                            dequantized per call: (N, K), never saved
        u = drop(x) Aᵀ                         (M, r), fp32
        y = x Wᵀ + s u Bᵀ + b

    Backward, from dY (M, N). y depends on x through x Wᵀ and through u = drop(x) Aᵀ:

        ∂L/∂u = (s dY) B = v                                                     (M, r)
        dX = dY W + (∂L/∂u) A ⊙ D / (1 - p) = dY W + D ⊙ (v A) / (1 - p)         (W dequantized again)
        dA = (∂L/∂u)ᵀ drop(x) = vᵀ drop(x)                                        (r, K)
        dB = (∂L/∂y)ᵀ (s u) = (s dY)ᵀ u                                          (N, r)
        db = Σ_m dY                                                              (when the bias trains)

    int8 (W8A16): W = diag(c) C with C the int8 weight and c = SCB / 127 its row scales, so
    x Wᵀ = (x Cᵀ) diag(c) (the scales on the output columns, in the epilogue) and dY W = (dY diag(c)) C
    (the scales on dY's columns), C cast exactly to the compute dtype: on the triton paths. The PyTorch path forms
    W = C ⊙ c as bitsandbytes' CPU training matmul does, in forward and backward alike (``_reference_weight``),
    except when M < K, where c goes on the (M, N) side as on the kernels (``_scales_on_rows``).

    Saved: x (not the dropped copy: D is redrawn from the seed), u (M, r) fp32, A, B and the seed; the
    quantized weight is kept by reference (bnb's packed tensors, no copy). No gradient for W: it is frozen.
    ``path``: ``"reference"`` (PyTorch, ``_reference_forward``: W from ``_reference_weight``, a temporary, + the
    matmuls, PEFT + bnb's CPU operations in their order), ``"fused"`` (one kernel, W dequantized in its K loop)
    or ``"dequant"`` (one dequant pass into the workspace + bf16 LoRA's timed forward, ``ops.lora._forward``).
    Backward on the triton paths: 4-bit dequantizes into the workspace (only for dX) and runs bf16 LoRA's
    timed backward (``ops.lora._backward``: the kernels, one dY pass, the torch composition, and on sm_90+
    the dY pass fused into dX's TMA GEMM); int8 scales dY's columns (in fp16 W's rows instead: dY ⊙ c would
    fall below fp16's normal range) and runs LoRA's GEMM choice for dX.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, qw, scaling, dropout_p, seed, path):
        ctx.qw, ctx.scaling, ctx.p, ctx.seed, ctx.path = qw, scaling, dropout_p, seed, path
        ctx.cpu_stream = use_cpu_stream(x)  # the mask's stream, as the forward drew it: the backward redraws that one
        ctx.has_bias = bias is not None
        thr = dropout_threshold(dropout_p) if dropout_p > 0.0 else 0
        ds = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
        if path == "reference":
            y, u = _reference_forward(x, lora_A, lora_B, bias, qw, scaling, dropout_p, seed)
        else:
            y, u = _triton_forward(x, lora_A, lora_B, bias, qw, scaling, thr, ds, seed, path)
        ctx.save_for_backward(x, u, lora_A, lora_B)
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        x, u, lora_A, lora_B = ctx.saved_tensors
        qw, s, p, seed = ctx.qw, ctx.scaling, ctx.p, ctx.seed
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        thr = dropout_threshold(p) if p > 0.0 else 0
        ds = 1.0 / (1.0 - p) if p > 0.0 else 1.0
        if ctx.path != "reference":
            no_second_derivatives("qlora_linear")
        dy = dy.contiguous()
        dx = da = dbb = dbias = None
        if ctx.path == "reference":
            if need_x:  # with create_graph autograd saves W for the double backward
                saved = torch.is_grad_enabled() and dy.requires_grad
                if _scales_on_rows(qw, dy.shape[0], dy.dtype) and not saved:  # int8, M < K: (dY diag(c)) C
                    dx = (dy * _int8_scales(qw)).to(dy.dtype) @ _reference_weight(qw, dy.dtype, scaled=False)
                else:
                    dx = dy @ _reference_weight(qw, dy.dtype, saved=saved)
            # the products in the order autograd takes them through PEFT's ``lora_B(lora_A(x)) * s``: dY s first
            # (so that fp32 gradients are PEFT's bit for bit, whatever s), then B, then A / drop(x)
            keep = keep_mask_stream(x, p, seed, ctx.cpu_stream) if thr else None  # bool (M, K)
            dys = dy.float() * s                                               # (M, N)
            v = dys @ lora_B.float()                                           # (M, r): s dY B
            if keep is not None:
                v.mul_(ds)  # 1/(1-p) on v (M, r) for both D ⊙ (v A) and vᵀ (D ⊙ x), not on an (M, K) product
            if need_x:
                low = v @ lora_A.float()
                if keep is not None:
                    low.mul_(keep)
                dx += low.to(dy.dtype)
                dx = dx.to(x.dtype)
            if need_a:
                xd = x.float() if keep is None else (x * keep).float()
                da = (v.t() @ xd).to(lora_A.dtype)
            if need_b:
                if torch.is_grad_enabled():  # create_graph: u recomputed by recorded ops (see lora_cpu.recorded_u)
                    xd = x if keep is None else x * keep
                    u = xd.float() @ lora_A.float().t() * ds
                dbb = (dys.t() @ u).to(lora_B.dtype)
        elif qw.kind != "int8":
            # bf16 LoRA's backward on the dequantized W (dequantized only for dX): its timed compositions.
            from . import lora as OL
            KL, KQ = _kernels()
            w = KQ.dequantize_4bit(qw, dy.dtype, weight_workspace(qw, dy.dtype)) if need_x else None
            dx, da, dbb = OL._backward(dy, x, u, w, lora_A, lora_B, s, seed, thr, ds, need_x, need_a, need_b)
        else:
            KL, KQ = _kernels()
            v = KL.lora_shrink(dy, lora_B, 1.0, 0, 0, 0, 0) if (need_x or need_a) else None
            if need_x:  # W8A16: dY's columns take the row scales, then the exact int8 -> dtype weight
                w = KQ.int8_weight(qw, dy.dtype, weight_workspace(qw, dy.dtype))
                c = _int8_scales(qw)
                if dy.dtype == torch.float16:  # dY ⊙ c (c ~ 5e-4) would fall below fp16's normal range: c on W
                    w.mul_(c.unsqueeze(1))
                    a = dy
                else:
                    a = (dy.float() * c).to(dy.dtype)
                from . import lora as OL
                key = OL.dx_key(dy.shape[0], w.shape[0], w.shape[1], lora_A.shape[0], dy.dtype, thr > 0)
                dx = OL.lora_gemm(a, w, v, lora_A, scale=s * ds, seed=seed, threshold=thr, key=key)  # LoRA's choice
            if need_a:
                da = KL.lora_shrink(x.t(), v, s * ds, seed, thr, 1, x.shape[1]).t().to(lora_A.dtype)
            if need_b:
                dbb = KL.lora_shrink(dy.t(), u, s, 0, 0, 0, 0).to(lora_B.dtype)
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        return dx, da, dbb, dbias, None, None, None, None, None


_kernel_modules = None


def _kernels() -> tuple:
    """``(kernels.lora, kernels.quant)``, imported at the first triton call (they import triton) and kept: the two
    import statements cost 1.5 µs a call."""
    global _kernel_modules
    if _kernel_modules is None:
        from ..kernels import lora as KL
        from ..kernels import quant as KQ

        _kernel_modules = (KL, KQ)
    return _kernel_modules


def _triton_forward(x, lora_A, lora_B, bias, qw, scaling: float, thr: int, ds: float, seed, path: str) -> tuple:
    """``(y, u)`` of the triton paths (see ``QLoRALinearFunction``): the fused kernel (always for int8), or one
    dequantization into the workspace and bf16 LoRA's forward (``ops.lora._forward``: shrink and GEMM, each
    timed as for LoRA)."""
    KL, KQ = _kernels()
    if path == "fused" or qw.kind == "int8":
        return KQ.qlora_fused(x, qw, lora_A, lora_B, bias, scaling, ds, seed, thr)
    from . import lora as OL  # imports the kernels: only on the triton path
    # W in the workspace, then bf16 LoRA's own forward: the faster (timed per shape) of the shrink + its GEMM
    # choice, the torch composition and, on sm_90+, the shrink fused into the TMA GEMM.
    w = KQ.dequantize_4bit(qw, x.dtype, weight_workspace(qw, x.dtype))
    return OL._forward(x, w, bias, lora_A, lora_B, scaling, thr, ds, seed)


def _label(qw: QuantizedWeight) -> str:
    return f"module {qw.name!r}" if qw.name else "this layer"


def choose_path(qw: QuantizedWeight, M: int, device: torch.device, run_fused, run_dequant) -> str:
    """``"fused"`` or ``"dequant"`` for a 4-bit forward of M rows: the environment's FASTPEFT_QLORA_PATH when
    forced, ``"dequant"`` where the fused kernel cannot run (``kernels.quant.fused_unsupported_reason``),
    else the faster of the two measured once per shape (``kernels.lora.timed_choice``; fused under the
    interpreter). int8 weights always take the fused W8A16 kernel."""
    KL, KQ = _kernels()
    if qw.kind == "int8":
        return "fused"
    mode = KL.env_choice("FASTPEFT_QLORA_PATH", PATHS)  # read at every call: a change takes effect at once
    reason = KQ.fused_unsupported_reason(qw, M)
    if mode == "fused" and reason is not None:
        raise ValueError(f"FASTPEFT_QLORA_PATH=fused cannot run {_label(qw)}: {reason}")
    if reason is not None:
        return "dequant"
    if mode != "auto":
        return mode
    key = ("qlora", 1 << max(0, M - 1).bit_length(), qw.shape, qw.kind, qw.blocksize, qw.nested)
    # Both candidates can run here: the settled answer (off CUDA, deterministic, tracing, a timed key) needs none
    name = KL.settled_choice(_path_cache, key, device, "dequant", "fused")
    if name is not None:
        return name
    return KL.timed_choice(_path_cache, key, mode, device, {"fused": run_fused, "dequant": run_dequant}, "dequant")


def qlora_linear_op(x, qweight: QuantizedWeight, bias, lora_A, lora_B, scaling: float, p: float, seed: int,
                    backend: str, path=None, compute_dtype=None) -> torch.Tensor:
    """The op behind ``fastpeft.functional.qlora_linear`` (arguments checked, dropout rate ``p`` final, ``seed``
    drawn, ``backend`` resolved to ``"reference"`` or ``"triton"`` there). x: (..., in) -> (..., out) in x's dtype,
    computed in the layer's compute dtype, or under autocast in autocast's (as bitsandbytes' matmul and PEFT's LoRA
    branch run there; the op's own products then without autocast). ``path`` ("fused" / "dequant") pins the
    triton forward; None chooses."""
    if compute_dtype is None and x.dtype != torch.float64 and autocast_enabled(x):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return qlora_linear_op(x, qweight, bias, lora_A, lora_B, scaling, p, seed, backend, path, dtype)
    cdt = compute_dtype or qweight.compute_dtype_for(x)
    lead = x.shape[:-1]
    x2 = _to(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), cdt)  # a 2-D x as it is: the kernels take any strides
    args = (_to(lora_A, cdt), _to(lora_B, cdt), None if bias is None else _to(bias, cdt), qweight, float(scaling), p,
            seed)
    if func_transforms_active():
        # torch.func (grad, vmap, ...): plain autograd on W dequantized for the call (a fresh tensor there), the same
        # mask; the Function defines no setup_context / vmap rule
        y = lora_linear_ref(x2, _reference_weight(qweight, cdt), args[2], args[0], args[1], float(scaling), p, True,
                            seed, cpu_stream=use_cpu_stream(x2))
        y = _to(y, x.dtype)
        return y if x2 is x else y.view(*lead, qweight.shape[0])
    if backend == "reference":
        name = "reference"
    elif path is not None:
        if path not in ("fused", "dequant"):
            raise ValueError(f"path must be None, 'fused' or 'dequant', got {path!r}")
        if path == "fused" and qweight.kind != "int8" and qweight.shape[1] % qweight.blocksize:
            from ..kernels.quant import fused_unsupported_reason
            raise ValueError(f"path='fused' cannot run {_label(qweight)}: "
                             f"{fused_unsupported_reason(qweight, 0)}")
        name = path
    else:
        m = x2.shape[0]

        def run(which):
            return lambda: QLoRALinearFunction.apply(x2, *args, which)
        name = choose_path(qweight, m, x.device, run("fused"), run("dequant"))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2,) + args[:3]):
        y = QLoRALinearFunction.apply(x2, *args, name)
    elif name == "reference":
        y = _reference_forward(x2, *args)[0]  # nothing to differentiate: no autograd Function, nothing saved
    else:
        thr = dropout_threshold(p) if p > 0.0 else 0
        y = _triton_forward(x2, *args[:3], qweight, float(scaling), thr, 1.0 / (1.0 - p) if p > 0.0 else 1.0, seed,
                            name)[0]
    y = _to(y, x.dtype)
    return y if x2 is x else y.view(*lead, qweight.shape[0])


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where t already has it (``.to`` then returns t, at 0.5 µs)."""
    return t if t.dtype == dtype else t.to(dtype)
