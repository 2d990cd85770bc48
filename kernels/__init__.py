"""Triton kernels of fastpeft, installed as ``fastpeft.kernels``.

This package imports only torch and triton. Triton is optional: where it does not import (no Linux
wheel, a broken install), ``HAS_TRITON`` is False and ``TRITON_IMPORT_ERROR`` says why, so the rest of
fastpeft runs on its pure-PyTorch reference path and asking for the triton backend fails with that
reason instead of an ImportError deep inside a kernel.
"""
import os

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
    TRITON_VERSION = triton.__version__
except Exception as exc:  # ImportError, or a triton wheel that fails while loading its libraries
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    TRITON_VERSION = None

# Read once: triton itself reads it at import time, so changing it later has no effect either.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Fused ops provided by this package. fastpeft.functional reads it to decide whether the triton
# backend can run an op at all.
OPS: frozenset = (frozenset({"lora_linear", "lora_linear_multi", "sparse_delta_linear", "lora_sparse_linear"})
                  if HAS_TRITON else frozenset())
# The ops that backend="auto" runs on the fused kernels for CUDA tensors: those whose kernels have
# passed the GPU tests on a real card (benchmarks/device_check.sh; H200, triton 3.6, 2026-11-26). The
# others run there only when asked for with backend="triton", until a device check has passed.
AUTO_OPS: frozenset = frozenset({"lora_linear", "lora_linear_multi"}) & OPS

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "TRITON_VERSION", "INTERPRET", "OPS", "AUTO_OPS"]
