"""Host time of one ``lora_linear`` call at decode size, on the CPU: what the Python path costs before any
kernel runs (checks, backend dispatch, autocast, reshape, the autograd Function, the timed choices).

    python benchmarks/host_lora.py [--calls 10000]

Runs under TRITON_INTERPRET=1 with the kernel launchers replaced by stubs that only allocate their outputs,
so the triton path's host work is timed without the interpreter; the reference path runs as it is (its
matmuls on tiny tensors cost little). Rows: the functional call at M = 1 and 16 rows, and ``FastLoRALinear``'s
forward (eval, no_grad, one adapter) on the triton backend, and on its default one here (the reference
backend's CPU path). Prints µs per call (median of 5 rounds of ``--calls`` calls each), in
this process's CPU time (``time.process_time``: a machine shared with other jobs stretches wall time, not it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft._checks import check_lora_linear_args  # noqa: E402
from fastpeft.functional import resolve_backend  # noqa: E402
from fastpeft.kernels import lora as K  # noqa: E402


def _stub_launchers():
    """Launchers that allocate their outputs and launch nothing."""
    K.shrink_op = lambda a, b, **kw: a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)
    K.gemm_op = lambda a, b, lu, lv, **kw: a.new_empty((a.shape[0], b.shape[1]))
    K.lowrank_add_op = lambda out, lu, lv, **kw: out


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(calls, 200)):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        rounds.append((time.process_time() - t0) / calls * 1e6)
    return statistics.median(rounds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=10000)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    k, n, r = 64, 64, 8  # sizes do not matter to the host path; M = 1 (one decode token) and 16
    w, b = torch.randn(n, k), torch.randn(n)
    a, bb = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    layer = fastpeft.FastLoRALinear(k, n, r=r, init_lora_weights=False).eval()
    _stub_launchers()
    xs = {m: torch.randn(m, k) for m in (1, 16)}
    x = xs[1]

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    rows = {
        "checks (check_lora_linear_args)": lambda: check_lora_linear_args(x, w, b, a, bb, 2.0, 0.0),
        "dispatch (resolve_backend)": lambda: resolve_backend("lora_linear", "triton", x, w, a, bb),
    }
    for m, xm in xs.items():
        rows[f"lora_linear triton, stub kernels, no_grad, M={m}"] = no_grad(
            lambda xm=xm: fastpeft.lora_linear(xm, w, b, a, bb, 2.0, backend="triton"))
    for m, xm in xs.items():  # the layer's backend is "auto" (reference on CPU tensors): a use_backend block
        rows[f"FastLoRALinear eval triton, no_grad, M={m}"] = ("triton", no_grad(lambda xm=xm: layer(xm)))
    rows["lora_linear triton, stub kernels, grad, M=1"] = lambda: fastpeft.lora_linear(x, w, b, a, bb, 2.0,
                                                                                        backend="triton")
    rows["lora_linear reference, no_grad, M=1"] = no_grad(
        lambda: fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="reference"))
    rows["FastLoRALinear eval auto (CPU path), no_grad, M=1"] = no_grad(lambda: layer(x))
    print(f"host µs per call, CPU time (torch {torch.__version__}, {args.calls} calls x 5 rounds, median)")
    for name, fn in rows.items():
        block = contextlib.nullcontext()
        if isinstance(fn, tuple):  # (backend, fn): the block is entered once, outside the timed calls
            block, fn = fastpeft.use_backend(fn[0]), fn[1]
        with block:
            us = per_call_us(fn, args.calls)
        print(f"  {name:<48} {us:8.2f}")


if __name__ == "__main__":
    main()
