"""LoRA over a quantized (bitsandbytes 4-bit / 8-bit) base weight: the autograd Function and its glue.

``qlora_linear(x, qweight, bias, lora_A, lora_B, scaling, ...)`` is ``lora_linear`` with the frozen weight given
as a ``fastpeft.quant.QuantizedWeight`` (the packed bnb weight read in place). The weight is dequantized per
call and never kept: forward and backward each dequantize it again (into the shared per-device workspace on
the triton path; a temporary on the reference path).

Dtypes follow bitsandbytes' Linear4bit: x, bias, lora_A and lora_B are cast to the layer's compute dtype
(``qweight.compute_dtype_for(x)``), the output back to x's dtype; gradients flow back through those casts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import INT8_INV_SCALE, QuantizedWeight, dequantize_weight
from ..reference import dropout_mask, dropout_threshold

PATHS = ("auto", "fused", "dequant")
_path_cache: dict = {}


def _keep(seed, m: int, k: int, p: float, device) -> torch.Tensor:
    return dropout_mask(seed, m, k, p, device=device)


class QLoRALinearFunction(torch.autograd.Function):
    r"""LoRA over a quantized frozen weight W (N, K); x is 2-D here, (M, K), in the compute dtype.

    With s the scaling, p the dropout rate, D the keep-mask of x (M, K) (the Philox stream of
    ``fastpeft.reference.dropout_mask`` for ``seed``) and drop(x) = D ⊙ x / (1 - p):

        W = deq(Wq)                            dequantized per call: (N, K), never saved
        u = drop(x) Aᵀ                         (M, r), fp32
        y = x Wᵀ + s u Bᵀ + b

    Backward, from dY (M, N). y depends on x through x Wᵀ and through u = drop(x) Aᵀ:

        ∂L/∂u = s dY B = s v,   v = dY B                                         (M, r)
        dX = dY W + (∂L/∂u) A ⊙ D / (1 - p) = dY W + s D ⊙ (v A) / (1 - p)       (W dequantized again)
        dA = (∂L/∂u)ᵀ drop(x) = s vᵀ drop(x)                                      (r, K)
        dB = (∂L/∂y)ᵀ (s u) = s dYᵀ u                                            (N, r)
        db = Σ_m dY                                                              (when the bias trains)

    int8 (W8A16): W = diag(c) C with C the int8 weight and c = SCB / 127 its row scales, so
    x Wᵀ = (x Cᵀ) diag(c) (the scales on the output columns, in the epilogue) and dY W = (dY diag(c)) C
    (the scales on dY's columns), C cast exactly to the compute dtype.

    Saved: x (not the dropped copy: D is redrawn from the seed), u (M, r) fp32, A, B and the seed; the
    quantized weight is kept by reference (bnb's packed tensors, no copy). No gradient for W: it is frozen.
    ``path``: ``"reference"`` (PyTorch: ``fastpeft.quant.dequantize_weight``, bit-exact with dequantize_ref, + matmuls), ``"fused"`` (one kernel, W dequantized in
    its K loop) or ``"dequant"`` (one dequant pass into the workspace + the LoRA GEMM); backward on the triton
    paths always dequantizes into the workspace and runs the LoRA GEMM of ``kernels.lora``.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, qw, scaling, dropout_p, seed, path):
        ctx.qw, ctx.scaling, ctx.p, ctx.seed, ctx.path = qw, scaling, dropout_p, seed, path
        ctx.has_bias = bias is not None
        thr = dropout_threshold(dropout_p) if dropout_p > 0.0 else 0
        ds = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
        if path == "reference":
            w = dequantize_weight(qw, x.dtype)
            xd = x if thr == 0 else x * _keep(seed, x.shape[0], x.shape[1], dropout_p, x.device).to(x.dtype) * ds
            u = (xd.float() @ lora_A.float().t())
            y = F.linear(x, w, bias) + (scaling * (u.to(x.dtype) @ lora_B.t())).to(x.dtype)
        else:
            from ..kernels import lora as KL
            from ..kernels import quant as KQ

            if path == "fused" or qw.kind == "int8":
                y, u = KQ.qlora_fused(x, qw, lora_A, lora_B, bias, scaling, ds, seed, thr)
            else:
                u = KL.lora_shrink(x, lora_A.t(), ds, seed, thr, x.shape[1], 1)
                w = KQ.dequantize_4bit(qw, x.dtype)
                y = KL.lora_gemm(x, w.t(), u, lora_B.t(), bias, scaling, 0, 0)
        ctx.save_for_backward(x, u, lora_A, lora_B)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, lora_A, lora_B = ctx.saved_tensors
        qw, s, p, seed = ctx.qw, ctx.scaling, ctx.p, ctx.seed
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        thr = dropout_threshold(p) if p > 0.0 else 0
        ds = 1.0 / (1.0 - p) if p > 0.0 else 1.0
        dy = dy.contiguous()
        dx = da = dbb = dbias = None
        if ctx.path == "reference":
            keep = _keep(seed, x.shape[0], x.shape[1], p, x.device).to(torch.float32) if thr else None
            v = dy.float() @ lora_B.float()                                    # (M, r)
            if need_x:
                low = s * (v @ lora_A.float())
                if keep is not None:
                    low = low * keep * ds
                if qw.kind == "int8":
                    dys = (dy.float() * (qw.scales.float() * INT8_INV_SCALE)).to(dy.dtype)
                    dx = (dys @ qw.data.to(dy.dtype) + low.to(dy.dtype)).to(x.dtype)
                else:
                    dx = (dy @ dequantize_weight(qw, dy.dtype) + low.to(dy.dtype)).to(x.dtype)
            if need_a:
                xd = x.float() if keep is None else x.float() * keep * ds
                da = (s * (v.t() @ xd)).to(lora_A.dtype)
            if need_b:
                dbb = (s * (dy.float().t() @ u)).to(lora_B.dtype)
        else:
            from ..kernels import lora as KL
            from ..kernels import quant as KQ

            v = KL.lora_shrink(dy, lora_B, 1.0, 0, 0, 0, 0) if (need_x or need_a) else None
            if need_x:
                if qw.kind == "int8":
                    w = KQ.int8_weight(qw, dy.dtype)
                    a = (dy.float() * (qw.scales.float() * INT8_INV_SCALE)).to(dy.dtype)
                else:
                    w = KQ.dequantize_4bit(qw, dy.dtype)
                    a = dy
                dx = KL.lora_gemm(a, w, v, lora_A, None, s * ds, seed, thr)
            if need_a:
                da = KL.lora_shrink(x.t(), v, s * ds, seed, thr, 1, x.shape[1]).t().to(lora_A.dtype)
            if need_b:
                dbb = KL.lora_shrink(dy.t(), u, s, 0, 0, 0, 0).to(lora_B.dtype)
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        return dx, da, dbb, dbias, None, None, None, None, None


def _label(qw: QuantizedWeight) -> str:
    return f"module {qw.name!r}" if qw.name else "this layer"


def choose_path(qw: QuantizedWeight, M: int, device: torch.device, run_fused, run_dequant) -> str:
    """``"fused"`` or ``"dequant"`` for a 4-bit forward of M rows: the environment's FASTPEFT_QLORA_PATH when
    forced, ``"dequant"`` where the fused kernel cannot run (``kernels.quant.fused_unsupported_reason``),
    else the faster of the two measured once per shape (``kernels.lora.timed_choice``; fused under the
    interpreter). int8 weights always take the fused W8A16 kernel."""
    from ..kernels import lora as KL
    from ..kernels import quant as KQ

    if qw.kind == "int8":
        return "fused"
    mode = KL.env_choice("FASTPEFT_QLORA_PATH", PATHS)
    reason = KQ.fused_unsupported_reason(qw, M)
    if mode == "fused" and reason is not None:
        raise ValueError(f"FASTPEFT_QLORA_PATH=fused cannot run {_label(qw)}: {reason}")
    if reason is not None:
        return "dequant"
    key = ("qlora", 1 << max(0, M - 1).bit_length(), qw.shape, qw.kind, qw.blocksize, qw.nested)
    return KL.timed_choice(_path_cache, key, mode, device, {"fused": run_fused, "dequant": run_dequant}, "dequant")


def _resolve(backend, x: torch.Tensor) -> str:
    """``"reference"`` or ``"triton"`` (the project's rule: "auto" takes triton only for ops that passed a GPU
    check, listed in ``fastpeft.kernels.AUTO_OPS``; QLoRA has not yet)."""
    from .. import kernels
    from ..functional import current_backend  # the backend of this call / block / environment

    name = current_backend(backend)
    if name == "reference":
        return name
    reason = None
    if not kernels.HAS_TRITON:
        reason = f"triton does not import ({kernels.TRITON_IMPORT_ERROR})"
    elif x.device.type == "cpu" and not kernels.INTERPRET:
        reason = "the tensors are on the CPU; set TRITON_INTERPRET=1 before importing triton to run kernels there"
    elif x.device.type not in ("cpu", "cuda"):
        reason = f"triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got device {x.device}"
    if name == "triton":
        if reason is not None:
            raise RuntimeError(f"backend 'triton' is not available for qlora_linear: {reason}. "
                               "Use backend='reference' (or 'auto') to run the PyTorch path.")
        return "triton"
    return "triton" if reason is None and x.device.type == "cuda" and "qlora_linear" in kernels.AUTO_OPS \
        else "reference"


def _check(x, qw, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qweight must be a fastpeft.quant.QuantizedWeight (QuantizedWeight.from_module(layer)), "
                        f"got {type(qw).__name__}")
    out_f, in_f = qw.shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x's last dim must be in_features={in_f}, got "
                         f"{x.shape[-1] if x.dim() else '0-d tensor'}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must have shape (r, {in_f}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, lora_A.shape[0]):
        raise ValueError(f"lora_B must have shape ({out_f}, {lora_A.shape[0]}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != qw.device:
            raise ValueError(f"{name} must be on the quantized weight's device {qw.device}, got {t.device}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def qlora_linear(x, qweight: QuantizedWeight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True,
                 seed=None, backend=None, path=None) -> torch.Tensor:
    """LoRA over a quantized base: ``y = x deq(W)^T + b + scaling * (drop(x) A^T) B^T``.

    x: (..., in), any strides; qweight: ``QuantizedWeight`` (out, in); bias (out,) or None; lora_A (r, in);
    lora_B (out, r). Returns (..., out) in x's dtype, computed in the layer's compute dtype. Dropout as
    ``lora_linear`` (mask a pure function of ``seed``, drawn when None). Differentiable in x, lora_A, lora_B
    and bias. ``path`` ("fused" / "dequant") pins the triton forward (tests, benchmarks); None chooses.
    """
    _check(x, qweight, bias, lora_A, lora_B, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    seed = 0 if seed is None else int(seed)
    cdt = qweight.compute_dtype_for(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    args = (lora_A.to(cdt), lora_B.to(cdt), bias.to(cdt) if bias is not None else None, qweight, float(scaling), p,
            seed)
    if _resolve(backend, x) == "reference":
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
    y = QLoRALinearFunction.apply(x2, *args, name)
    return y.to(x.dtype).view(*lead, qweight.shape[0])
