"""The functional ops and the one place that picks a backend for them.

Backends:
- ``"reference"``: the plain-PyTorch ops of :mod:`fastpeft.reference` (any device, torch autograd).
- ``"triton"``: the fused kernels of :mod:`fastpeft.kernels` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``). Asking for it where it cannot run raises; it never falls back silently.
- ``"auto"`` (default): triton where it can run the op on the given tensors, else reference.

The backend of a call is, in order: its ``backend=`` argument, the innermost ``use_backend`` block,
the ``FASTPEFT_BACKEND`` environment variable, ``"auto"``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading

import torch

from . import kernels
from ._checks import (autocast_on, check_lora_linear_args, check_lora_multi_args, check_same_device_dtype,
                      check_sparse_delta, check_tensor, expand_adapter_ids)
from .ops.lora_cpu import lora_linear_cpu
from .reference import (dropout_threshold, lora_linear_multi_cpu, lora_linear_multi_ref, lora_linear_ref,
                        lora_sparse_linear_ref, sparse_delta_linear_ref, use_cpu_path)

BACKENDS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ENV = "FASTPEFT_BACKEND"
_backend_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastpeft_backend", default=None)
# The innermost use_backend block as compiled code sees it: dynamo cannot read a ContextVar, but it reads a
# thread-local attribute and guards on it (a compiled function is traced again when the block changes).
_compiled_view = threading.local()


def _check_backend_name(name, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` (``"auto"``, ``"triton"`` or ``"reference"``).

    Blocks nest; a call's own ``backend=`` argument still wins. Thread- and task-local (contextvars);
    torch.compile sees the innermost block of the thread (and traces again when it changes), and a block
    may also sit inside a compiled function.
    """
    name = _check_backend_name(name, "use_backend's name")
    if torch.compiler.is_compiling():  # no ContextVar in a traced function: only the view compiled code reads
        prev = getattr(_compiled_view, "name", None)
        _compiled_view.name = name
        try:
            yield
        finally:
            _compiled_view.name = prev
        return
    token = _backend_var.set(name)
    _compiled_view.name = name
    try:
        yield
    finally:
        _backend_var.reset(token)
        _compiled_view.name = _backend_var.get()


def current_backend(backend: str | None = None) -> str:
    """The backend name a call with ``backend=backend`` asks for, before ``"auto"`` is resolved."""
    if backend is not None:
        return _check_backend_name(backend, "backend")
    ctx = getattr(_compiled_view, "name", None) if torch.compiler.is_compiling() else _backend_var.get()
    if ctx is not None:
        return ctx
    env = os.environ.get(_ENV)
    if env:
        return _check_backend_name(env, f"the environment variable {_ENV}")
    return "auto"


def triton_unavailable_reason(op: str, *tensors: torch.Tensor) -> str | None:
    """Why the triton backend cannot run ``op`` on ``tensors``, or None when it can."""
    if not kernels.HAS_TRITON:
        return f"triton does not import here ({kernels.TRITON_IMPORT_ERROR})"
    if op not in kernels.OPS:
        return f"fastpeft.kernels has no fused kernel for {op} in this version"
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not kernels.INTERPRET:
            return "the tensors are on the CPU; set TRITON_INTERPRET=1 before importing triton to run kernels there"
        if t.device.type not in ("cpu", "cuda"):
            return f"triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got device {t.device}"
        if t.dtype not in _KERNEL_DTYPES:
            return f"the kernels take float32, float16 or bfloat16 tensors, got {t.dtype}"
    return None


def resolve_backend(op: str, backend: str | None, *tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for a call of ``op`` on ``tensors``; raises if triton is asked
    for and cannot run. ``"auto"`` takes triton only for CUDA tensors, and only for the ops whose
    kernels have passed a GPU check (``fastpeft.kernels.AUTO_OPS``)."""
    name = current_backend(backend)
    if name == "reference":
        return name
    reason = triton_unavailable_reason(op, *tensors)
    if name == "triton":
        if reason is not None:
            raise RuntimeError(f"backend 'triton' is not available for {op}: {reason}. "
                               "Use backend='reference' (or 'auto') to run the PyTorch path.")
        return name
    on_cuda = all(t is None or t.device.type == "cuda" for t in tensors)
    return "triton" if reason is None and on_cuda and op in kernels.AUTO_OPS else "reference"


def draw_seed(device=None):
    """A dropout seed drawn from torch's default CPU generator, so ``torch.manual_seed`` makes runs
    repeatable and ``torch.utils.checkpoint`` (which restores that generator) redraws the same one.

    Eager: a Python int. While torch.compile traces: the same draw as a one-element int64 tensor on
    ``device`` (``.item()`` would break the graph), which the reference ops and the kernels read as the
    seed without a host sync. The compiled graph draws it from the default CPU generator on every call
    (inductor's RNG is seeded from that generator too), so seeding and checkpointing behave as in eager.
    """
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if torch.compiler.is_compiling():
        return seed.to(device) if device is not None else seed
    return int(seed.item())


def _seed_arg(seed):
    """The seed as the Functions and kernels take it: 0 for None, a drawn tensor as it is, else an int."""
    if seed is None:
        return 0
    return seed if isinstance(seed, torch.Tensor) else int(seed)


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
        from .kernels import lora as K

        thr = dropout_threshold(dropout_p) if dropout_p > 0.0 else 0
        drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
        k = x.shape[1]
        u = K.shrink_op(x, lora_A.t(), drop_scale, seed, thr, k, 1)

        key = ("fwd", _bucket(x.shape[0]), k, weight.shape[0], lora_A.shape[0], x.dtype, bias is not None)
        y = lora_gemm(x, weight.t(), u, lora_B.t(), bias, scaling, 0, 0, key)
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
        dx = dw = db = None
        v, da, dbb = lora_factor_grads(dy, x, u, lora_A, lora_B, s, ds, seed, thr, need_x, need_a, need_bb)
        if need_x:
            key = ("dx", _bucket(x.shape[0]), weight.shape[0], k, lora_A.shape[0], x.dtype, thr > 0)
            dx = lora_gemm(dy, weight, v, lora_A, None, s * ds, seed, thr, key)
        dw, db = base_grads(dy, x, weight, need_w, need_b and ctx.has_bias)
        return dx, dw, db, da, dbb, None, None, None


def base_grads(dy, x, weight, need_w: bool, need_b: bool) -> tuple:
    """``(dW, db)`` of the frozen base layer, each None unless required: dW = dY^T x, db = sum_m dY."""
    dw = (dy.t() @ x).to(weight.dtype) if need_w else None
    db = dy.sum(0) if need_b else None
    return dw, db


def lora_factor_grads(dy, x, u, lora_A, lora_B, s, ds, seed, thr, need_v, need_a, need_b) -> tuple:
    """``(v, dA, dB)`` on the kernels, each None when not needed: v = dY B (M, r) fp32 (for dX or dA),
    dA = s·ds·v^T (mask * x), dB = s·dY^T u. x (M, K), u = drop(x) A^T; ds = 1/(1-p), mask from seed."""
    from .kernels import lora as K

    v = da = db = None
    if need_v or need_a:
        v = K.shrink_op(dy, lora_B, 1.0, 0, 0, 0, 0)
    if need_a:
        da = K.shrink_op(x.t(), v, s * ds, seed, thr, 1, x.shape[1]).t().to(lora_A.dtype)
    if need_b:
        db = K.shrink_op(dy.t(), u, s, 0, 0, 0, 0).to(lora_B.dtype)
    return v, da, db


def lora_gemm(a, b, lu, lv, bias, scale, seed, thr, key):
    """``a @ b + scale * mask * (lu @ lv) + bias`` on the faster of the fused-epilogue GEMM and cuBLAS +
    an in-place low-rank update, chosen per shape ``key`` (``kernels.lora.choose_gemm``)."""
    from .kernels import lora as K

    def fused():
        return K.gemm_op(a, b, lu, lv, bias, scale, seed, thr)

    def cublas():
        out = torch.addmm(bias, a, b) if bias is not None else a @ b
        if thr == 0:
            return out.addmm_(lu.to(out.dtype), lv, alpha=scale)
        return K.lowrank_add_op(out, lu, lv, scale, seed, thr)

    return fused() if K.choose_gemm(key, fused, cublas, a.device) == "fused" else cublas()


def _bucket(m: int) -> int:
    """Token counts within a power of two share a measured GEMM choice."""
    return 1 << max(0, int(m) - 1).bit_length()


def autocast_inputs(x: torch.Tensor, *tensors):
    """``(x, *tensors)`` cast to the autocast dtype when autocast is on for x's device (None kept), as
    nn.Linear's matmul would cast them; the kernels then run with autocast off."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None else None for t in (x, *tensors))


def _lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """Reshape to 2-D, follow autocast as nn.Linear does, and run the fused Function."""
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        y = LoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                     _seed_arg(seed))
    return y.view(*lead, weight.shape[0])


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, seed=None,
                backend=None) -> torch.Tensor:
    """LoRA linear: ``y = x W^T + b + scaling * (drop(x) A^T) B^T``.

    x: (..., in), any strides; weight: (out, in); bias: (out,) or None; lora_A: (r, in);
    lora_B: (out, r); returns (..., out). Dropout applies to the LoRA branch's input only, when
    ``training`` and ``dropout_p > 0``; its mask is a pure function of ``seed`` (drawn from torch's
    generator when None). Differentiable in x, lora_A, lora_B, and bias / weight where they require grad.
    """
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    if resolve_backend("lora_linear", backend, x, weight, lora_A, lora_B) == "triton":
        return _lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    if use_cpu_path(x):  # no dropped copy of x kept; the CPU dropout stream (see reference.py)
        return lora_linear_cpu(x, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    return lora_linear_ref(x, weight, bias, lora_A, lora_B, float(scaling), p, training, seed)


def lora_linear_multi(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks=None,
                      backend=None, dropout_p=None, training=True, seed=None, check_ids=True) -> torch.Tensor:
    """Many LoRA adapters in one batch: each row of x gets its own adapter (or none).

    x: (..., in); weight (out, in); bias (out,) or None; lora_A_stack (n, r_max, in);
    lora_B_stack (n, out, r_max); scalings (n,); adapter_ids: int tensor of shape x.shape[:-1] (per
    row) or (x.shape[0],) (per sequence), -1 = base only; ranks (n,) or None (all r_max): adapter i
    uses A_i[:ranks[i]] and B_i[:, :ranks[i]]; dropout_p (n,) per-adapter rates or None.
    Returns (..., out). Differentiable: each row's gradient reaches only its own adapter (and x).
    ``check_ids=False`` skips the ids' range check (a host sync) for ids known to be valid.
    """
    n = check_lora_multi_args(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ranks, dropout_p)
    ids = expand_adapter_ids(adapter_ids, x, n, check_range=check_ids)
    if not isinstance(scalings, torch.Tensor):
        raise TypeError(f"scalings must be a tensor of shape ({n},), got {type(scalings).__name__}")
    # Whether any rate is > 0 is a host sync, skipped while compiling: rates of 0 keep every element.
    use_dropout = training and dropout_p is not None and n > 0 and (
        torch.compiler.is_compiling() or bool((dropout_p > 0).any()))
    if use_dropout and seed is None:
        seed = draw_seed(x.device)
    name = resolve_backend("lora_linear_multi", backend, x, weight, lora_A_stack, lora_B_stack)
    if name == "triton":
        from .multi import lora_linear_multi_triton

        return lora_linear_multi_triton(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks,
                                        dropout_p if use_dropout else None, seed)
    multi_ref = lora_linear_multi_cpu if use_cpu_path(x) else lora_linear_multi_ref  # CPU dropout stream
    return multi_ref(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks,
                                 dropout_p if use_dropout else None, training, seed)


def sparse_delta_linear(x, weight, bias, delta_indices, delta_values, block_size=1, backend=None,
                        check=True, plan=None) -> torch.Tensor:
    """Sparse-delta linear: ``y = x (W + Δ)^T + b`` with Δ a few entries (or blocks) of W's shape.

    x: (..., in); weight (out, in); bias (out,) or None. block_size 1: delta_indices (nnz,) int32/int64
    flat row-major indices into W, sorted and unique; delta_values (nnz,). block_size b > 1:
    delta_indices (nblocks, 2) block (row, col) coordinates in units of b, sorted and unique;
    delta_values (nblocks, b, b). Differentiable in x and delta_values (and bias / weight where they
    require grad); the triton path never forms an (out, in) gradient. ``check=False`` skips the
    indices' range / order checks (a host sync) for indices known to be valid; ``plan`` is the cached
    tile bucketing of the indices (``fastpeft.sparse.SparsePlan``), built when None.
    """
    check_tensor(weight, "weight", ndim=2)
    check_lora_linear_args(x, weight, bias, weight.new_empty(0, weight.shape[1]), weight.new_empty(weight.shape[0], 0),
                           1.0, 0.0)
    check_sparse_delta(delta_indices, delta_values, weight.shape[0], weight.shape[1], block_size, check_order=check)
    # Under autocast the values may be of another dtype than x, as the weight may (see check_lora_linear_args).
    check_same_device_dtype("x", x, not autocast_on(x), delta_values=delta_values)
    if resolve_backend("sparse_delta_linear", backend, x, weight, delta_values) == "triton":
        from .sparse import sparse_delta_linear_triton

        return sparse_delta_linear_triton(x, weight, bias, delta_indices, delta_values, block_size, plan)
    return sparse_delta_linear_ref(x, weight, bias, delta_indices, delta_values, block_size)


def lora_sparse_linear(x, weight, bias, lora_A, lora_B, scaling, delta_indices, delta_values, block_size=1,
                       dropout_p=0.0, training=True, seed=None, backend=None, check=True, plan=None) -> torch.Tensor:
    """LoRA beside a sparse delta (RoSA): ``y = x (W + Δ)^T + b + scaling (drop(x) A^T) B^T``, one op.

    Arguments as ``lora_linear`` and ``sparse_delta_linear``; gradients for x, lora_A, lora_B,
    delta_values (and bias / weight where they require grad).
    """
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    check_sparse_delta(delta_indices, delta_values, weight.shape[0], weight.shape[1], block_size, check_order=check)
    # Under autocast the values may be of another dtype than x, as the weight may (see check_lora_linear_args).
    check_same_device_dtype("x", x, not autocast_on(x), delta_values=delta_values)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    if resolve_backend("lora_sparse_linear", backend, x, weight, lora_A, lora_B, delta_values) == "triton":
        from .sparse import lora_sparse_linear_triton

        return lora_sparse_linear_triton(x, weight, bias, lora_A, lora_B, float(scaling), delta_indices, delta_values,
                                         block_size, p, seed, plan)
    return lora_sparse_linear_ref(x, weight, bias, lora_A, lora_B, float(scaling), delta_indices, delta_values,
                                  block_size, p, training, seed)
