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

import torch

from . import kernels
from ._checks import check_lora_linear_args
from .reference import lora_linear_ref

BACKENDS = ("auto", "triton", "reference")
_ENV = "FASTPEFT_BACKEND"
_backend_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastpeft_backend", default=None)


def _check_backend_name(name, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` (``"auto"``, ``"triton"`` or ``"reference"``).

    Blocks nest; a call's own ``backend=`` argument still wins. Thread- and task-local (contextvars).
    """
    token = _backend_var.set(_check_backend_name(name, "use_backend's name"))
    try:
        yield
    finally:
        _backend_var.reset(token)


def current_backend(backend: str | None = None) -> str:
    """The backend name a call with ``backend=backend`` asks for, before ``"auto"`` is resolved."""
    if backend is not None:
        return _check_backend_name(backend, "backend")
    ctx = _backend_var.get()
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
    return None


def resolve_backend(op: str, backend: str | None, *tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for a call of ``op`` on ``tensors``; raises if triton is asked
    for and cannot run. ``"auto"`` takes triton only for CUDA tensors."""
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
    return "triton" if reason is None and on_cuda else "reference"


def draw_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator, so ``torch.manual_seed`` makes runs
    repeatable and ``torch.utils.checkpoint`` (which restores that generator) redraws the same one."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


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
    use_dropout = training and dropout_p > 0.0
    if use_dropout and seed is None:
        seed = draw_seed()
    name = resolve_backend("lora_linear", backend, x, weight, lora_A, lora_B)
    if name == "triton":  # pragma: no cover - no fused LoRA kernel is registered in kernels.OPS yet
        raise AssertionError("unreachable: resolve_backend only returns 'triton' for registered ops")
    return lora_linear_ref(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), training, seed)
