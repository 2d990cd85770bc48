"""The functional ops and the one place that picks a backend for them.

Backends:
- ``"reference"``: the plain-PyTorch ops of :mod:`fastpeft.reference` (any device, torch autograd).
- ``"triton"``: the fused kernels of :mod:`fastpeft.kernels` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``). Asking for it where it cannot run raises; it never falls back silently.
- ``"auto"`` (default): triton where it can run the op on the given tensors, else reference.

The backend of a call is, in order: its ``backend=`` argument, the innermost ``use_backend`` block,
the ``FASTPEFT_BACKEND`` environment variable, ``"auto"``.

The triton paths (autograd Functions on the kernels) are in :mod:`fastpeft.ops`, one module per op
family; they import triton, so they are imported when a call takes the triton backend.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading

import torch

from . import kernels
from ._checks import (autocast_on, check_bool, check_dora_linear_args, check_lora_conv_args, check_lora_experts_args,
                      check_lora_linear_args, check_lora_multi_args, check_qlora_linear_args, check_same_device_dtype,
                      check_seed, check_sparse_delta, check_tensor, expand_adapter_ids, up_projection)
from .ops import conv as _conv
from .ops import experts as _experts
from .ops.common import autocast_inputs, draw_seed
from .ops.dora import dora_linear as _dora_linear_op  # plain torch at import; its kernels load on first use
from .ops.lora_cpu import lora_linear_cpu
from .ops.sparse_cpu import CPUPlan, lora_sparse_linear_cpu, sparse_delta_linear_cpu
from .reference import (func_transforms_active, lora_conv_ref, lora_linear_multi_cpu, lora_linear_multi_ref,
                        lora_linear_ref, lora_sparse_linear_ref, sparse_delta_linear_ref, use_cpu_path, use_cpu_stream)

BACKENDS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ENV = "FASTPEFT_BACKEND"
_backend_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastpeft_backend", default=None)
# The innermost use_backend block as compiled code sees it: dynamo cannot read a ContextVar, but it reads a
# thread-local attribute and guards on it (a compiled function is traced again when the block changes).
_compiled_view = threading.local()


def _check_backend_name(name, source: str) -> str:
    low = name.lower() if isinstance(name, str) else None
    if low not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return low


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
    env = kernels.getenv(_ENV)  # read at every call (cheaply): a change takes effect at once
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


# What resolve_backend answered, by everything the answer depends on: the op, the asked name, the kernel
# state and the tensors' devices and dtypes. Only answers are kept; a refusal is worked out (and raised) anew.
_RESOLVED: dict = {}


def resolve_backend(op: str, backend: str | None, *tensors: torch.Tensor, memo: dict | None = None) -> str:
    """``"triton"`` or ``"reference"`` for a call of ``op`` on ``tensors``; raises if triton is asked
    for and cannot run. ``"auto"`` takes triton only for CUDA tensors, and only for the ops whose
    kernels have passed a GPU check (``fastpeft.kernels.AUTO_OPS``).

    The answer is cached by the asked name (the call's, the ``use_backend`` block's or the environment's,
    read at every call), the kernel state and the tensors' devices and dtypes. ``memo``: a dict already
    tied to the tensors' devices and dtypes (``check_lora_linear_args``'s), which then holds the answers
    instead of a key built here. Nothing is cached while torch.compile traces."""
    name = current_backend(backend)
    if name == "reference":
        return name
    if func_transforms_active():
        if name == "triton":
            raise RuntimeError(f"backend 'triton' cannot run {op} under torch.func transforms (grad, vmap, ...): its "
                               "autograd Functions define no setup_context / vmap rule. Use backend='reference' (or "
                               "'auto'), which runs plain autograd compositions there.")
        return "reference"
    # The kernel state is read at every call: tests (and a late TRITON_INTERPRET) change it.
    state = (op, name, kernels.HAS_TRITON, kernels.INTERPRET, kernels.OPS, kernels.AUTO_OPS)
    cache, key = memo, state
    if memo is None:
        cache, key = _RESOLVED, None
        if not torch.compiler.is_compiling():
            key = state + tuple(t if t is None else (t.device, t.dtype) for t in tensors)
    if key is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    resolved = _resolve(op, name, tensors)
    if key is not None:
        if len(cache) >= 4096:  # a bound for programs that sweep devices / dtypes
            cache.clear()
        cache[key] = resolved
    return resolved


def _resolve(op: str, name: str, tensors: tuple) -> str:
    """resolve_backend's answer for the asked ``name`` (``"auto"`` or ``"triton"``), worked out."""
    reason = triton_unavailable_reason(op, *tensors)
    if name == "triton":
        if reason is not None:
            raise RuntimeError(f"backend 'triton' is not available for {op}: {reason}. "
                               "Use backend='reference' (or 'auto') to run the PyTorch path.")
        return name
    on_cuda = all(t is None or t.device.type == "cuda" for t in tensors)
    return "triton" if reason is None and on_cuda and op in kernels.AUTO_OPS else "reference"


def _rate_and_seed(dropout_p, training: bool, seed, device) -> tuple:
    """``(p, seed)`` of a single-rate op: the dropout rate in effect (0.0 out of training) and its seed, drawn
    (``draw_seed``) when the rate is > 0 and none was given."""
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed(device)
    return p, seed


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, seed=None,
                backend=None) -> torch.Tensor:
    """LoRA linear: ``y = x W^T + b + scaling * (drop(x) A^T) B^T``.

    x: (..., in), any strides; weight: (out, in); bias: (out,) or None; lora_A: (r, in);
    lora_B: (out, r); returns (..., out). Dropout applies to the LoRA branch's input only, when
    ``training`` and ``dropout_p > 0``; its mask is a pure function of ``seed`` (drawn from torch's
    generator when None). Differentiable in x, lora_A, lora_B, and bias / weight where they require grad.
    """
    memo = check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    check_bool(training, "training")
    check_seed(seed)
    p, seed = _rate_and_seed(dropout_p, training, seed, x.device)
    if resolve_backend("lora_linear", backend, x, weight, lora_A, lora_B, memo=memo) == "triton":
        return _triton_lora()(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    if use_cpu_path(x):  # no dropped copy of x kept; the CPU dropout stream (see reference.py)
        return lora_linear_cpu(x, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    # elsewhere plain autograd: torch.func transforms on CPU tensors (with the CPU stream's mask, as in eager), the
    # oracle under kernel_stream_on_cpu and on other devices
    return lora_linear_ref(x, weight, bias, lora_A, lora_B, float(scaling), p, training, seed,
                           cpu_stream=use_cpu_stream(x))


_triton_lora_fn = None


def _triton_lora():
    """``ops.lora._lora_linear_triton``, imported at the first triton call (ops.lora imports triton) and
    kept: the import statement costs 0.8 µs a call."""
    global _triton_lora_fn
    if _triton_lora_fn is None:
        from .ops.lora import _lora_linear_triton

        _triton_lora_fn = _lora_linear_triton
    return _triton_lora_fn


def lora_linear_multi(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks=None,
                      backend=None, dropout_p=None, training=True, seed=None, check_ids=True) -> torch.Tensor:
    """Many LoRA adapters in one batch: each row of x gets its own adapter (or none).

    x: (..., in); weight (out, in); bias (out,) or None; lora_A_stack (n, r_max, in);
    lora_B_stack (n, out, r_max); scalings (n,); adapter_ids: int tensor of shape x.shape[:-1] (per
    row) or (x.shape[0],) (per sequence), -1 = base only; ranks (n,) or None (all r_max): adapter i
    uses A_i[:ranks[i]] and B_i[:, :ranks[i]]; dropout_p (n,) per-adapter rates or None.
    Returns (..., out). Differentiable: each row's gradient reaches only its own adapter (and x).
    ``check_ids=False`` skips the range checks of adapter_ids, ranks and dropout_p (host syncs that stall a
    GPU decode step) for values known to be valid (a layer's own adapters, ids it routed itself).
    """
    n = check_lora_multi_args(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ranks, dropout_p,
                              check_values=check_ids)
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
        from .ops.multi import lora_linear_multi_triton

        return lora_linear_multi_triton(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ids, ranks,
                                        dropout_p if use_dropout else None, seed, bool(training))
    multi_ref = lora_linear_multi_cpu if use_cpu_stream(x) else lora_linear_multi_ref  # CPU dropout stream
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
    plan of the indices (``fastpeft.ops.sparse.build_sparse_plan``), built when None.
    """
    check_tensor(weight, "weight", ndim=2)
    check_lora_linear_args(x, weight, bias, weight.new_empty(0, weight.shape[1]), weight.new_empty(weight.shape[0], 0),
                           1.0, 0.0)
    check_sparse_delta(delta_indices, delta_values, weight.shape[0], weight.shape[1], block_size, check_order=check)
    # Under autocast the values may be of another dtype than x, as the weight may (see check_lora_linear_args).
    check_same_device_dtype("x", x, not autocast_on(x), delta_values=delta_values)
    if resolve_backend("sparse_delta_linear", backend, x, weight, delta_values) == "triton":
        from .ops.sparse import sparse_delta_linear_triton

        return sparse_delta_linear_triton(x, weight, bias, delta_indices, delta_values, block_size, plan)
    if use_cpu_path(x):  # no W + Δ saved, no dense (out, in) gradient; decode sizes by gathers
        return sparse_delta_linear_cpu(x, weight, bias, delta_indices, delta_values, block_size,
                                       plan if isinstance(plan, CPUPlan) else None)
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
    p, seed = _rate_and_seed(dropout_p, training, seed, x.device)
    if resolve_backend("lora_sparse_linear", backend, x, weight, lora_A, lora_B, delta_values) == "triton":
        from .ops.sparse import lora_sparse_linear_triton

        return lora_sparse_linear_triton(x, weight, bias, lora_A, lora_B, float(scaling), delta_indices, delta_values,
                                         block_size, p, seed, plan)
    if use_cpu_path(x):  # as sparse_delta_linear's, with the CPU dropout stream (as lora_linear's)
        return lora_sparse_linear_cpu(x, weight, bias, lora_A, lora_B, float(scaling), delta_indices, delta_values,
                                      block_size, p, seed, plan if isinstance(plan, CPUPlan) else None)
    return lora_sparse_linear_ref(x, weight, bias, lora_A, lora_B, float(scaling), delta_indices, delta_values,
                                  block_size, p, training, seed, cpu_stream=use_cpu_stream(x))  # as lora_linear's


def lora_conv(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, seed=None, stride=1, padding=0,
              dilation=1, backend=None) -> torch.Tensor:
    """LoRA on a convolution (PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d``):
    ``y = conv(x, W) + b + scaling * conv1x1(conv(drop(x), A), B)``.

    x: (N, C, *S) or unbatched (C, *S), 1-3 spatial dims; weight (O, C, *k) (groups 1); bias (O,) or None; lora_A
    (r, C, *k), convolved with the base's stride, padding and dilation; lora_B (O, r) (PEFT's (O, r, 1, ...) kernel
    viewed 2-D). ``stride`` / ``padding`` / ``dilation`` as ``torch.nn.functional.conv2d``'s (``"same"`` and
    ``"valid"`` too). Returns (N, O, *S'). Dropout as ``lora_linear``'s (the branch's input only, mask from
    ``seed``). Differentiable in x, lora_A, lora_B (and weight / bias where they require grad); no dropped copy of x
    is kept for backward, and the rank-r branch is folded into the kernel (``conv(x, W + s B A)``, the base's cost)
    wherever forming it costs less than a second convolution of x: no-grad calls, and the input gradient without
    dropout. ``backend="triton"`` raises: convolutions run on torch's own (cuDNN / oneDNN) kernels.
    """
    batched, stride, padding, dilation = check_lora_conv_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                                              stride, padding, dilation)
    check_bool(training, "training")
    check_seed(seed)
    if not batched:  # (before the seed is drawn: a drawn one is a tensor while compiling, which check_seed refuses)
        return lora_conv(x.unsqueeze(0), weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed, stride,
                         padding, dilation, backend).squeeze(0)
    p, seed = _rate_and_seed(dropout_p, training, seed, x.device)
    resolve_backend("lora_conv", backend, x, weight, lora_A, lora_B)  # (no kernel: a "triton" request raises)
    numeric = _conv.numeric_padding(padding, tuple(weight.shape[2:]), dilation)
    if func_transforms_active() or numeric is None:  # plain autograd: torch.func, or "same" padded unevenly
        return lora_conv_ref(x, weight, bias, lora_A, lora_B, float(scaling), p, training, seed, stride, padding,
                             dilation, cpu_stream=use_cpu_stream(x))
    return _conv_call(lambda *t: _conv.lora_conv_fused(*t, float(scaling), p, seed, (stride, numeric, dilation),
                                                       use_cpu_stream(x)), x, weight, bias, lora_A, lora_B)


def _conv_call(fn, x, *tensors):
    """``fn(x, *tensors)``; under autocast with the inputs cast as the base convolution would cast them and autocast
    off inside (the convolution ops' Functions)."""
    if not autocast_on(x):
        return fn(x, *tensors)
    cast = autocast_inputs(x, *tensors)
    with torch.autocast(x.device.type, enabled=False):
        return fn(*cast)


def dora_conv(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True, seed=None, stride=1,
              padding=0, dilation=1, backend=None) -> torch.Tensor:
    """DoRA on a convolution (PEFT's ``DoraConv1d`` / ``2d`` / ``3d`` layers):
    ``y = g ⊙ (conv(x, W) + s conv1x1(conv(x, A), B)) + b``, ``g = m / ‖W + s B A‖`` per output channel (the norm
    over the input channels and the kernel, detached). In training with dropout, PEFT's form: ``conv(x, W) + b +
    (g − 1) ⊙ conv(drop(x), W) + g ⊙ s conv1x1(conv(drop(x), A), B)``.

    Arguments as ``lora_conv``'s; magnitude (O,) or PEFT's (1, O, 1, ...) Parameter. Returns (N, O, *S').
    Differentiable in x, lora_A, lora_B, magnitude (and weight / bias where they require grad); without dropout
    the low-rank part runs ``lora_conv``'s fused Function, and no kernel-sized temporary is formed for the norm.
    """
    batched, stride, padding, dilation = check_lora_conv_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                                              stride, padding, dilation)
    check_tensor(magnitude, "magnitude")
    if magnitude.numel() != weight.shape[0] or not magnitude.is_floating_point() or magnitude.device != x.device:
        raise ValueError(f"magnitude must be a floating tensor of {weight.shape[0]} elements (one per output channel) "
                         f"on x's device {x.device}, got {tuple(magnitude.shape)} {magnitude.dtype} on "
                         f"{magnitude.device}")
    check_bool(training, "training")
    check_seed(seed)
    if not batched:  # (before the seed is drawn, as lora_conv's)
        return dora_conv(x.unsqueeze(0), weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, seed,
                         stride, padding, dilation, backend).squeeze(0)
    p, seed = _rate_and_seed(dropout_p, training, seed, x.device)
    resolve_backend("dora_conv", backend, x, weight, lora_A, lora_B)  # (no kernel: a "triton" request raises)
    numeric = _conv.numeric_padding(padding, tuple(weight.shape[2:]), dilation)
    fused = numeric is not None and not func_transforms_active()
    geo = (stride, numeric if fused else padding, dilation)

    def call(*t):
        return _conv.dora_conv_impl(*t, magnitude, float(scaling), p, seed, geo, use_cpu_stream(x), fused)
    return _conv_call(call, x, weight, bias, lora_A, lora_B) if fused else call(x, weight, bias, lora_A, lora_B)


def qlora_linear(x, qweight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, seed=None, backend=None,
                 path=None) -> torch.Tensor:
    """LoRA over a quantized base: ``y = x deq(W)^T + b + scaling * (drop(x) A^T) B^T``.

    x: (..., in), any strides; qweight: ``fastpeft.quant.QuantizedWeight`` (out, in), a bitsandbytes layer's
    packed weight read in place (``QuantizedWeight.from_module(layer)``); bias (out,) or None; lora_A (r, in);
    lora_B (out, r). Returns (..., out) in x's dtype, computed in the layer's compute dtype (x, bias, A, B cast
    to it, gradients flowing back through the casts). Dropout as ``lora_linear``. Differentiable in x, lora_A,
    lora_B and bias. ``path`` ("fused" / "dequant") pins the triton forward (tests, benchmarks); None chooses.
    """
    memo = check_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p)
    check_bool(training, "training")
    check_seed(seed)
    p, seed = _rate_and_seed(dropout_p, training, seed, x.device)
    name = resolve_backend("qlora_linear", backend, x, lora_A, lora_B, memo=memo)
    return _qlora_op()(x, qweight, bias, lora_A, lora_B, float(scaling), p, 0 if seed is None else seed, name, path)


_qlora_op_fn = None


def _qlora_op():
    """``ops.qlora.qlora_linear_op``, imported at the first call and kept (as ``_triton_lora``)."""
    global _qlora_op_fn
    if _qlora_op_fn is None:
        from .ops.qlora import qlora_linear_op

        _qlora_op_fn = qlora_linear_op
    return _qlora_op_fn


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True, seed=None,
                dropout_mode="exact", weight_sq_norm=None, backend=None, norm_cache=None) -> torch.Tensor:
    """DoRA linear (PEFT's ``use_dora=True``): ``y = (m / ‖W + sBA‖_row) ⊙ (x Wᵀ + s drop(x) Aᵀ Bᵀ) + b``,
    the norm detached and never formed as an (out, in) matrix.

    x: (..., in), any strides; weight: (out, in); bias: (out,) or None; lora_A: (r, in); lora_B: (out, r);
    magnitude: (out,) (PEFT's ``lora_magnitude_vector``); returns (..., out). ``dropout_mode``:
    ``"exact"`` (PEFT's training semantics with dropout: the base term on ``drop(x)`` too) or
    ``"lora_only"`` (opt-in, one GEMM: dropout on the LoRA branch only); eval is the same in both.
    ``weight_sq_norm``: ``‖W_j‖²`` (out,) fp32, cached by the caller while W is frozen (computed when None).
    ``norm_cache``: a dict the caller keeps (a layer's), where calls with nothing to differentiate keep the norm
    and ``m / norm`` for the W, A, B, magnitude they were computed from (see ``fastpeft.ops.dora.dora_linear``);
    not used under autocast. Differentiable in x, lora_A, lora_B, magnitude, and bias / weight where they
    require grad.
    """
    memo = check_dora_linear_args(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, seed,
                                  dropout_mode, weight_sq_norm)
    p, seed = _rate_and_seed(dropout_p, training, seed, x.device)
    name = resolve_backend("dora_linear", backend, x, weight, lora_A, lora_B, magnitude, memo=memo)
    if not autocast_on(x):
        return _dora_linear_op(x, weight, bias, lora_A, lora_B, magnitude, float(scaling), p, training, seed,
                               dropout_mode, weight_sq_norm, name, norm_cache)
    # the cast copies are new tensors every call: no norm_cache
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    with torch.autocast(x.device.type, enabled=False):
        return _dora_linear_op(x, weight, bias, lora_A, lora_B, magnitude, float(scaling), p, training, seed,
                               dropout_mode, weight_sq_norm, name)


def lora_experts(experts, hidden_states, top_k_index, top_k_weights, adapters=None, check_ids=True,
                 form=None, adapter_ids=None) -> torch.Tensor:
    """A mixture of experts' expert layer with LoRA on its 3-D expert weights (PEFT's ``target_parameters``), without
    ever forming ``W + ΔW``.

    experts: a transformers experts module (``use_experts_implementation``, transformers >= 5: ``gate_up_proj``
    (E, 2I, H) or ``up_proj``, ``down_proj`` (E, H, I); (E, in, out) when ``is_transposed``, as gpt-oss; biases,
    ``_apply_gate``, ``post_expert_norm`` as its flags say); hidden_states: (T, H); top_k_index: (T, k) int, the
    experts of each token; top_k_weights: (T, k), their routing weights. adapters: {"gate_up_proj" (or "up_proj") /
    "down_proj": [(lora_A (E, r, in), lora_B (E, out, r), scaling), ...]}; a token routed to expert e gets
    ``x W_eᵀ + s (x A_eᵀ) B_eᵀ`` in each projection (one term per adapter). Returns (T, H) in hidden_states' dtype:
    ``Σ_j w_j expert_{i_j}(x)``, as the module's own forward, with transformers' ``grouped_mm`` implementation's
    semantics: rows sorted by expert, the top-k sum per token, the products in the expert weights' dtype (the input
    cast to it; autocast does not apply).

    PEFT's ``ParamWrapper`` computes the same by folding every expert's ``s B_e A_e`` into an (E, out, in) copy of W
    on each call (and its backward builds an (E, out, in) gradient); here each expert costs its routed rows'
    products only. ``form``: ``"loop"`` (a pair of products per expert with rows, one host sync) or
    ``"grouped_mm"`` (``torch.nn.functional.grouped_mm``, no host sync); None picks
    (``fastpeft.ops.experts.pick_form``: grouped_mm on CUDA where it runs, on the CPU up to 32 rows per expert).
    ``check_ids=False`` skips the range check of top_k_index (a host sync) in the grouped_mm form, for ids a router
    made. No Triton kernel yet. Differentiable in hidden_states, top_k_weights, the factors and the expert weights.

    Many adapters in one batch: ``adapter_ids`` (T,) int, token t gets only adapter ``adapter_ids[t]``'s terms (-1:
    none), entry j of every adapters list being adapter j's (None where adapter j leaves that weight alone). Each
    adapter's update is computed for every row and masked: the cost of the LoRA products grows with the number of
    adapters (a few, as serving mixes), the base products' not.
    """
    check_bool(check_ids, "check_ids")
    adapters = check_lora_experts_args(experts, hidden_states, top_k_index, top_k_weights, adapters, adapter_ids,
                                       check_ids)
    up = up_projection(experts)
    weights = [getattr(experts, up), experts.down_proj]
    factors = [f for terms in adapters.values() for f in terms if f is not None]
    if form is None:
        form = _experts.pick_form(hidden_states, weights, factors, top_k_index.numel(), experts.num_experts)
    elif form not in _experts.FORMS:
        raise ValueError(f"form must be one of {_experts.FORMS} or None, got {form!r}")
    elif form == "grouped_mm":
        why = _experts.grouped_mm_refusal(hidden_states, weights, factors)
        if why is not None:
            raise ValueError(f"form='grouped_mm' cannot run here: {why}; form='loop' or None (picks) can")
    n_tok, k = top_k_index.shape
    groups = _experts.Groups(top_k_index, experts.num_experts, form, check_ids)
    transposed = bool(experts.is_transposed)

    row_adapter = None if adapter_ids is None else adapter_ids[groups.perm // k]  # (S,): each sorted row's adapter

    def project(name, x):
        bias = getattr(experts, name + "_bias") if experts.has_bias else None
        terms = adapters.get(name, [])
        used = [j for j, t in enumerate(terms) if t is not None]
        masks = None if row_adapter is None else [row_adapter == j for j in used]
        return groups.project(x, getattr(experts, name), bias, [terms[j] for j in used], transposed, masks)
    h = project(up, hidden_states[groups.perm // k])
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = project("down_proj", h)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[groups.perm].unsqueeze(-1)
    inv = torch.empty_like(groups.perm)
    inv[groups.perm] = torch.arange(groups.perm.numel(), device=groups.perm.device)
    return out[inv].view(n_tok, k, out.shape[-1]).sum(dim=1).to(hidden_states.dtype)
