"""Triton kernels of fastpeft, installed as ``fastpeft.kernels``.

This package imports only torch and triton. Triton is optional: where it does not import (no Linux
wheel, a broken install), ``HAS_TRITON`` is False and ``TRITON_IMPORT_ERROR`` says why, so the rest of
fastpeft runs on its pure-PyTorch reference path and asking for the triton backend fails with that
reason instead of an ImportError deep inside a kernel.
"""
import contextlib
import os

import torch

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


def getenv(name: str) -> str | None:
    """``os.environ.get(name)`` at a fraction of its cost (0.85 µs for an unset name on CPython 3.11: the
    Mapping's ``get`` raises and catches a KeyError), for the switches the hot paths read on every call so
    that a change takes effect at once. Reads the same dict ``os.environ`` writes (``setenv`` / ``delenv``
    included); falls back to ``os.environ.get`` where that mapping has no ``_data``."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None:
        return environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = environ.encodekey(name)
        if not torch.compiler.is_compiling():  # a traced function must not write module state
            _ENV_KEYS[name] = key
    raw = data.get(key)
    return None if raw is None else environ.decodevalue(raw)


_ENV_KEYS: dict = {}  # name -> os.environ's encoded key


# Read once: triton itself reads it at import time, so changing it later has no effect either.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Fused ops provided by this package. fastpeft.functional reads it to decide whether the triton
# backend can run an op at all.
OPS: frozenset = (frozenset({"lora_linear", "lora_linear_multi", "sparse_delta_linear", "lora_sparse_linear",
                              "qlora_linear", "dora_linear"})
                  if HAS_TRITON else frozenset())
# The ops that backend="auto" runs on the fused kernels for CUDA tensors: those whose kernels have
# passed the GPU tests on a real card (benchmarks/device_check.sh; H200, triton 3.6, 2026-11-26). The
# others run there only when asked for with backend="triton", until a device check has passed.
#
# The sparse ops (issue 12 item 5) join with one line: add "sparse_delta_linear", "lora_sparse_linear" to the
# set below (layers and fastpeft.functional route on the op names; nothing else changes). Their kernels have
# never run on a GPU yet. `bash benchmarks/device_check.sh --sparse` on the card must first show:
#   1. every sparse test passing: test_kernels_sparse.py and test_timed_choice.py -k sparse with explicit blocks,
#      and the gpu-marked ones (LLM shape bf16 within 2x PyTorch's error, torch.compile fullgraph, the floor
#      timed once per key with the reference's numbers, backend="auto" with the ops added here, bitwise
#      reproducibility in deterministic mode);
#   2. in the bench sparse table (M=8192, 4096x4096, 1 %, blocks 1 and 32, alone and RoSA r=16, fwd and
#      fwd+bwd): the "fastpeft" row (the floor) no slower than "reference" (what auto runs now), "scatter" and
#      "dense-dW" beyond the p20-p80 spread, and no slower than the faster of "fastpeft-kernels" /
#      "fastpeft-torch" by more than that spread (the floor picks right); its peak memory no higher than
#      "reference"'s. A case where the kernels side loses (path "torch") is fine: the floor covers it.
# An op that fails 1 stays out; one that passes 1 but not 2 stays out and its losing case goes to the issue.
AUTO_OPS: frozenset = frozenset({"lora_linear", "lora_linear_multi"}) & OPS

# ----------------------------------------------------------------------------------------------------
# deterministic mode
# ----------------------------------------------------------------------------------------------------

_ENV_DETERMINISTIC = "FASTPEFT_DETERMINISTIC"
_deterministic = False


def is_deterministic() -> bool:
    """Whether the kernels run in deterministic mode: on after ``set_deterministic(True)``, inside a
    ``deterministic()`` block, under ``torch.use_deterministic_algorithms(True)``, or with the environment
    variable ``FASTPEFT_DETERMINISTIC=1`` (read at each call)."""
    if _deterministic or torch.are_deterministic_algorithms_enabled():
        return True
    env = getenv(_ENV_DETERMINISTIC)
    if env is None:
        return False
    env = env.strip().lower()
    if env in ("", "0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    raise ValueError(f"{_ENV_DETERMINISTIC} must be 0 or 1, got {env!r}")


def set_deterministic(enabled: bool) -> None:
    """Make every fastpeft kernel path bitwise reproducible from run to run (``True``), or not (``False``).

    No kernel sums through atomics: every split reduction writes partial sums that are added in a fixed
    order, and split counts depend only on the shapes and the GPU. (The one atomic, the flag by which the
    TMA forward with the fused shrink publishes a row block's u, orders the programs and sums nothing.)
    What can differ between runs are the choices made by timing, so deterministic mode pins them: the fused-vs-cuBLAS GEMM choice of the LoRA ops (cuBLAS)
    and of the block-sparse ops (densify + cuBLAS) is fixed instead of measured, and the autotuned GEMMs
    (forced with ``FASTPEFT_LORA_GEMM=fused`` / ``FASTPEFT_SPARSE_GEMM=fused``) run one fixed config instead
    of the fastest one found by this process. Then the same inputs (and dropout seed) give the same output
    and gradient bits on every run, on the same GPU model with the same torch, triton and CUDA versions.
    The cost: no timing picks the faster path per shape.

    ``torch.use_deterministic_algorithms(True)`` and ``FASTPEFT_DETERMINISTIC=1`` turn the mode on too;
    ``set_deterministic(False)`` clears only this switch. Process-wide, like torch's flag.
    """
    global _deterministic
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _deterministic = enabled


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """``set_deterministic(enabled)`` for the block, restored after it (see ``set_deterministic``)."""
    prev = _deterministic
    set_deterministic(enabled)
    try:
        yield
    finally:
        set_deterministic(prev)


__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "TRITON_VERSION", "INTERPRET", "OPS", "AUTO_OPS", "is_deterministic",
           "set_deterministic", "deterministic", "getenv"]
