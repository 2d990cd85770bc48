"""LoRA on convolutions (PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d``): one autograd Function on torch's own
convolutions (cuDNN / oneDNN: no Triton kernel of ours computes a convolution), which keeps no dropped copy of x and
folds the rank-r branch into the base kernel wherever that costs less than convolving x a second time.

PEFT computes ``conv(x, W) + s conv1x1(conv(drop(x), A), B)``: the second convolution has only r output channels,
which runs far below the library's rate (on 2 CPU cores its input gradient cost half of the base's for a 64-channel
3x3 layer at r 16), and autograd keeps drop(x), a full copy of x, for A's gradient.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..reference import conv_keep_mask
from .common import recorded_grads, returned

CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def numeric_padding(padding, kernel: tuple, dilation: tuple) -> tuple | None:
    """``padding`` (an int, a tuple, ``"valid"`` or ``"same"``) as one int per spatial dim, what
    ``convolution_backward`` takes; None where ``"same"`` pads one side more than the other (an odd total,
    ``dilation * (k - 1)``), which ``F.conv`` does by padding x first."""
    d = len(kernel)
    if padding == "valid":
        return (0,) * d
    if padding == "same":
        totals = [dl * (k - 1) for k, dl in zip(kernel, dilation)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(padding) if isinstance(padding, (tuple, list)) else (int(padding),) * d


def folds(out_channels: int, rows: int) -> bool:
    """Whether ``W + s B A`` (one convolution with the base's cost) is cheaper than the rank-r convolution beside W:
    forming it costs ~``out (r + 1) C K`` multiply-adds, the thin convolution (or its input gradient) ~``rows r C K``,
    with rows = N times the output pixels."""
    return out_channels < rows


def folded_kernel(weight, lora_A, lora_B, alpha: float) -> torch.Tensor:
    """``W + alpha B A`` in W's shape (O, C, *k): A (r, C, *k), B (O, r); rounded once to W's dtype."""
    o, r = lora_B.shape
    return torch.addmm(weight.reshape(o, -1), lora_B, lora_A.reshape(r, -1), alpha=alpha).view(weight.shape)


def _rank_update_(y: torch.Tensor, lora_B: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """``y + alpha conv1x1(u, B)``: y (N, O, *S) and u (N, r, *S) as (N, O, P) / (N, r, P), one batched product
    into y in place (contiguous or channels-last: both flatten to views, a 1-d convolution's to itself); else, and
    while torch.compile traces (inductor fuses it), the product added out of place, in y's memory format."""
    n, o = y.shape[:2]
    yv, uv = y.flatten(2), u.flatten(2)
    b = lora_B.expand(n, *lora_B.shape)
    if not torch.compiler.is_compiling() and yv.data_ptr() == y.data_ptr() and (yv is y or yv._base is not None):
        yv.baddbmm_(b, uv, alpha=alpha)
        return y
    return torch.add(y, torch.matmul(lora_B, uv).view(y.shape), alpha=alpha)  # (the first operand's layout)


@contextlib.contextmanager
def _cudnn_pinned(x: torch.Tensor):
    """cuDNN's deterministic algorithms for the block where fastpeft's deterministic mode is on and x is on a GPU (its
    weight gradients otherwise may pick algorithms that sum through atomics); a no-op elsewhere and while compiling.
    Only ``deterministic`` and ``benchmark`` are set, and put back after (``cudnn.flags`` would reset the others:
    TF32 / fp32 precision)."""
    from .. import kernels

    if not x.is_cuda or torch.compiler.is_compiling() or not kernels.is_deterministic():
        yield
        return
    cudnn = torch.backends.cudnn
    prev = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = prev


def _conv_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, geo, cpu_stream) -> tuple:
    """``(y, u)``: y = conv(x, W) + b + s c conv1x1(u, B), u = conv(D ⊙ x, A) without 1/(1-p) (see the Function)."""
    stride, padding, dilation = geo
    conv = CONV_FNS[x.dim() - 2]
    y = conv(x, weight, bias, stride, padding, dilation)
    if p > 0.0:
        xd = x * conv_keep_mask(x, p, seed, cpu=cpu_stream)  # freed at once: only x is kept
        u = conv(xd, lora_A, None, stride, padding, dilation)
        del xd
        alpha = scaling / (1.0 - p)
    else:
        u = conv(x, lora_A, None, stride, padding, dilation)
        alpha = scaling
    return _rank_update_(y, lora_B, u, alpha), u


class LoRAConvFunction(torch.autograd.Function):
    r"""LoRA on a convolution, groups 1. x (N, C, *S), W (O, C, *k), b (O,) or None, A (r, C, *k), B (O, r), s the
    scaling; conv(·, K) the base's convolution (stride, padding, dilation) with kernel K, and A's with the same
    geometry (PEFT's A takes the base's kernel size, stride and padding; dilation is refused where it would differ).
    With D the keep-mask of the seed (drop rate p, x's shape) and c = 1 / (1 - p):

        u = conv(D ⊙ x, A)                     (N, r, *S'), without 1/(1-p)
        y = conv(x, W) + b + s c B u           B u: each output pixel's r-vector times B (a 1x1 convolution)

    Backward, from dY (N, O, *S'), with conv^T(·, K) the input gradient of conv(·, K) (linear in K):

        v   = s c Bᵀ dY                        (N, r, *S'), dL/du
        dX  = conv^T(dY, W) + D ⊙ conv^T(v, A)
            = conv^T(dY, W + s B A)            (p = 0: one input gradient on the folded kernel, where folding
                                                costs less than the thin one, ``folds``)
        dA  = Σ_n v_n ⋆ (D ⊙ x)_n              conv's weight gradient of (D ⊙ x, v), (r, C, *k)
        dB  = s c Σ_{n, pixels} dY uᵀ          (O, r)
        dW  = conv's weight gradient of (x, dY), db = Σ dY over all but the channels    (only when required)

    Saved: x, u (r channels), the parameters and the seed; D is redrawn in backward, drop(x) never kept (PEFT's
    autograd keeps it: a second copy of x per layer). Under ``create_graph`` the gradients are autograd's through the
    same formula recomputed by recorded ops (second derivatives)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, geo, cpu_stream):
        with _cudnn_pinned(x):
            y, u = _conv_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, geo, cpu_stream)
        seed_t = seed if isinstance(seed, torch.Tensor) else None
        ctx.save_for_backward(x, u, weight, bias, lora_A, lora_B, seed_t)
        ctx.seed = None if seed_t is not None else seed
        ctx.scaling, ctx.dropout_p, ctx.geo, ctx.cpu_stream = scaling, dropout_p, geo, cpu_stream
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        with _cudnn_pinned(dy):
            return LoRAConvFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, u, weight, bias, lora_A, lora_B, seed_t = ctx.saved_tensors
        seed = seed_t if seed_t is not None else ctx.seed
        s, p, (stride, padding, dilation) = ctx.scaling, ctx.dropout_p, ctx.geo
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph: differentiable gradients
            from ..reference import lora_conv_ref
            out = lora_conv_ref(x, weight, bias, lora_A, lora_B, s, p, True, seed, stride, padding, dilation,
                                cpu_stream=ctx.cpu_stream)
            return recorded_grads(out, (x, weight, bias, lora_A, lora_B), ctx.needs_input_grad[:5], dy, 5)
        n, o, r = dy.shape[0], dy.shape[1], lora_A.shape[0]
        c = 1.0 / (1.0 - p) if p > 0.0 else 1.0
        d = x.dim() - 2
        dyv = dy.flatten(2)  # (N, O, P)
        keep = conv_keep_mask(x, p, seed, cpu=ctx.cpu_stream) if p > 0.0 and (need_x or need_a) else None
        args = (stride, padding, dilation, False, (0,) * d, 1)
        dx = dw = db = da = dbb = None
        fold = need_x and p == 0.0 and folds(o, n * dyv.shape[2])
        if need_a or need_x and not fold:
            v = torch.matmul(lora_B.t().mul(s * c), dyv).view(n, r, *dy.shape[2:])  # s c Bᵀ dY, (N, r, *S')
        if need_a:  # first: D x is freed before dX's buffers exist
            xd = x if keep is None else x * keep
            da = torch.ops.aten.convolution_backward(v, xd, lora_A, None, *args, (False, True, False))[1]
            del xd
        if need_x:
            if fold:  # one input gradient on W + s B A
                kernel = folded_kernel(weight, lora_A, lora_B, s)
                dx = torch.ops.aten.convolution_backward(dy, x, kernel, None, *args, (True, False, False))[0]
            else:
                dx = torch.ops.aten.convolution_backward(dy, x, weight, None, *args, (True, False, False))[0]
                dxa = torch.ops.aten.convolution_backward(v, x, lora_A, None, *args, (True, False, False))[0]
                dx = dx.add_(dxa) if keep is None else dx.addcmul_(dxa, keep)
                del dxa
        if need_bb:
            dbb = torch.bmm(dyv, u.flatten(2).transpose(1, 2)).sum(0).mul_(s * c)
        if need_w:
            dw = torch.ops.aten.convolution_backward(dy, x, weight, None, *args, (False, True, False))[1]
        if need_b and bias is not None:
            db = dy.sum([i for i in range(dy.dim()) if i != 1])
        return dx, dw, db, da, dbb, None, None, None, None, None


def lora_conv_fused(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed, geo: tuple,
                    cpu_stream: bool) -> torch.Tensor:
    """``LoRAConvFunction`` where a gradient is taken, else its forward without autograd's cost, folded
    (``conv(x, W + s B A)``) where that is cheaper and no dropout applies. Shapes as the Function's; x batched;
    ``geo`` = (stride, padding, dilation) tuples, padding numeric."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)):
        return LoRAConvFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, geo, cpu_stream)
    if dropout_p == 0.0 and folds(weight.shape[0], x.shape[0] * _out_pixels(x, weight, geo)):
        return CONV_FNS[x.dim() - 2](x, folded_kernel(weight, lora_A, lora_B, scaling), bias, *geo)
    return _conv_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, geo, cpu_stream)[0]


def _out_pixels(x, weight, geo) -> int:
    """Output pixels per sample of the convolution of x (N, C, *S) by weight (O, C, *k) with ``geo``."""
    stride, padding, dilation = geo
    return math.prod([(s + 2 * pd - dl * (k - 1) - 1) // st + 1  # (a list: a generator breaks torch.compile's graph)
                      for s, k, st, pd, dl in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)])


def dora_conv_impl(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, p: float, seed, geo: tuple,
                   cpu_stream: bool, numeric: bool) -> torch.Tensor:
    r"""DoRA on a convolution, PEFT's ``_DoraConvNdLayer``; x batched, the arguments checked (``fastpeft.dora_conv``).

    With n_j = ‖W_j + s B_j A‖ over C and the kernel (detached, as PEFT: DoRA's section 4.3) and g = m / n:

        p = 0:  y = g ⊙ z + b,   z = conv(x, W) + s B conv(x, A)  (``lora_conv``: its fused Function)
        p > 0 (PEFT's training form): y = conv(x, W) + b + (g − 1) ⊙ conv(D x, W) + g ⊙ s B conv(D x, A), D x the
                dropped x (autograd keeps it, as PEFT's; one more convolution of x by W, as PEFT's)

    g's gradient (the magnitude's, dm_j = Σ dY_j z_j / n_j) and everything else by autograd through these products;
    n from ``ops.dora.dora_norm`` on W, A as (O, C·K) / (r, C·K) matrices (factored, no kernel-sized temporary;
    exact where it cancels). g and the sum in fp32 (fp64 for fp64), rounded once to x's dtype: |g − 1| is below
    bf16's resolution early in training."""
    from ..reference import conv_dropout, lora_conv_ref
    from .dora import dora_norm

    o, r = lora_B.shape
    n = dora_norm(weight.detach().reshape(o, -1), lora_A.detach().reshape(r, -1), lora_B.detach(), scaling)
    g = magnitude.reshape(o).to(n.dtype) / n
    view = (1, o) + (1,) * (x.dim() - 2)
    g = g.view(view)
    stride, padding, dilation = geo
    if p == 0.0:
        z = (lora_conv_fused(x, weight, None, lora_A, lora_B, scaling, 0.0, None, geo, cpu_stream) if numeric else
             lora_conv_ref(x, weight, None, lora_A, lora_B, scaling, 0.0, False, None, stride, padding, dilation))
        y = z.to(g.dtype) * g
        return (y if bias is None else y + bias.to(g.dtype).view(view)).to(z.dtype)
    conv = CONV_FNS[x.dim() - 2]
    xd = conv_dropout(x, p, seed, cpu=cpu_stream)
    base = conv(x, weight, bias, stride, padding, dilation)
    yd = conv(xd, weight, None, stride, padding, dilation)
    low = conv(conv(xd, lora_A, None, stride, padding, dilation), lora_B.view(o, r, *(1,) * (x.dim() - 2)))
    y = base.to(g.dtype) + (g - 1.0) * yd.to(g.dtype) + g * (scaling * low.to(g.dtype))
    return y.to(base.dtype)
