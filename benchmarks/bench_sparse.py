"""Sparse-delta linear ``y = x (W + Δ)^T + b``: frozen nn.Linear (the floor) vs the usual torch ways vs fastpeft.

    fastpeft bench sparse                             # the default grid for this machine
    fastpeft bench sparse --tokens 8192 --shape 4096x4096 --density 0.01 --block 1 32 --json out.json
    python benchmarks/bench_sparse.py ...             # the same, from a checkout

Providers:
- ``linear``: frozen nn.Linear (fwd+bwd computes dX only).
- ``scatter``: clone W, scatter the values in (``index_add``) and ``F.linear``, all torch autograd (the
  PEFT-SHiRA / RoSA way): backward forms the dense (out, in) gradient of W + Δ and gathers from it.
- ``dense-dW``: a custom autograd.Function (the SpIEL way): the same forward, backward computes
  dW = dY^T X densely in fp32 and gathers the entries' gradients from it.
- ``fastpeft``: ``fastpeft.sparse_delta_linear`` on the triton backend (CUDA only), with a cached plan;
  ``fastpeft-fused`` / ``fastpeft-dense`` (blocks: each GEMM variant forced) and ``fastpeft-tile`` /
  ``fastpeft-gather`` (entries: each SDDMM forced) beside it.

Modes: ``fwd`` and ``fwd+bwd`` (W frozen; dX and the values' gradient), each with its peak memory on
CUDA. Ratios are to ``linear`` of the same case, measured in the same run.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Group, env_vars, parse_kxn  # noqa: E402

import fastpeft  # noqa: E402

DENSITIES = [0.001, 0.01, 0.05]
BLOCKS = [1, 16, 32]


def make_delta(out_f, in_f, density, block, device, dtype, seed=0):
    """Random sorted indices at ``density`` (of entries, or of b x b blocks), values, and the flat
    indices of every entry inside W (clipped blocks dropped) with the positions of their values."""
    g = torch.Generator().manual_seed(seed)
    rb, cb = -(-out_f // block), -(-in_f // block)
    n = max(1, round(density * rb * cb))
    pos = torch.randperm(rb * cb, generator=g)[:n].sort().values
    if block == 1:
        idx = pos.to(device)
        values = torch.randn(n, generator=g).to(device, dtype) * 0.01
        return idx, values, idx, torch.arange(n, device=device)
    idx = torch.stack([pos // cb, pos % cb], 1).to(device)
    values = torch.randn(n, block, block, generator=g).to(device, dtype) * 0.01
    r = idx[:, 0, None, None] * block + torch.arange(block, device=device)[None, :, None]
    c = idx[:, 1, None, None] * block + torch.arange(block, device=device)[None, None, :]
    inside = ((r < out_f) & (c < in_f)).flatten()
    flat = (r * in_f + c).flatten()
    return idx, values, flat[inside], torch.arange(flat.numel(), device=device)[inside]


def scatter_linear(x, weight, bias, values, flat, which):
    """Clone + scatter + F.linear: torch autograd keeps the dense gradient of W + Δ and gathers from it."""
    w2 = weight.flatten().index_add(0, flat, values.flatten()[which]).view_as(weight)
    return F.linear(x, w2, bias)


class DenseGradGather(torch.autograd.Function):
    """SpIEL-style: the forward of ``scatter_linear``; backward dX = dY (W + Δ) and dW = dY^T X in fp32,
    dense, then the entries' gradients gathered from it."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, flat, which):
        w2 = weight.flatten().index_add(0, flat, values.flatten()[which]).view_as(weight)
        ctx.save_for_backward(x, weight, values, flat, which)
        return F.linear(x, w2, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, values, flat, which = ctx.saved_tensors
        w2 = weight.flatten().index_add(0, flat, values.flatten()[which]).view_as(weight)
        dx = dy @ w2
        dw = torch.mm(dy.t().float(), x.float())
        dv = torch.zeros(values.numel(), device=values.device, dtype=torch.float32)
        dv[which] = dw.flatten()[flat]
        return dx, None, None, dv.view_as(values).to(values.dtype), None, None


def providers(block, kernels_ok: bool) -> dict:
    """name -> (kind, env overrides)."""
    out = {"linear": ("linear", {}), "scatter": ("scatter", {}), "dense-dW": ("dense-dW", {})}
    if kernels_ok:
        out["fastpeft"] = ("fastpeft", {})
        if block > 1:
            out["fastpeft-fused"] = ("fastpeft", {"FASTPEFT_SPARSE_GEMM": "fused"})
            out["fastpeft-dense"] = ("fastpeft", {"FASTPEFT_SPARSE_GEMM": "dense"})
        else:
            out["fastpeft-tile"] = ("fastpeft", {"FASTPEFT_SPARSE_SDDMM": "tile"})
            out["fastpeft-gather"] = ("fastpeft", {"FASTPEFT_SPARSE_SDDMM": "gather"})
    return out


def step_fn(kind, envs, mode, x, lin, delta, plan, dy):
    """One timed call: forward, or forward + dX and the values' gradient."""
    idx, values, flat, which = delta
    block = values.shape[-1] if values.dim() == 3 else 1
    weight, bias = lin.weight, lin.bias
    wrt = [x] if kind == "linear" else [x, values]

    def forward():
        if kind == "linear":
            return lin(x)
        if kind == "scatter":
            return scatter_linear(x, weight, bias, values, flat, which)
        if kind == "dense-dW":
            return DenseGradGather.apply(x, weight, bias, values, flat, which)
        return fastpeft.functional.sparse_delta_linear(x, weight, bias, idx, values, block, backend="triton",
                                                       check=False, plan=plan)

    def fn():
        with env_vars(envs):
            y = forward()
            if mode == "fwd+bwd":
                torch.autograd.grad(y, wrt, dy)
    return fn


def groups(m, k, n, d, b, modes, ctx):
    """One case's layer, inputs and delta (and the kernels' plan), built once; one group per mode."""
    device, dtype = ctx.device, ctx.dtype
    torch.manual_seed(0)
    lin = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    idx, values, flat, which = make_delta(n, k, d, b, device, dtype)
    values.requires_grad_()
    plan = None
    if ctx.kernels_ok:
        from fastpeft.ops.sparse import build_sparse_plan

        plan = build_sparse_plan(idx, n, k, b)  # built once per set of indices, as a layer caches it
    for mode in modes:
        calls = {name: step_fn(kind, envs, mode, x, lin, (idx, values, flat, which), plan, dy)
                 for name, (kind, envs) in providers(b, ctx.kernels_ok).items()}
        # r and p: the column names of the earlier tables' JSON, kept for readers of benchmarks/results
        yield Group({"nnz": values.numel(), "mode": mode}, calls, extra=lambda name, times: dict(r=b, p=d))


def cases(args, ctx) -> list:
    """Every (tokens, block, density) of the options, on the one shape."""
    k, n = args.shape
    return [Case(dict(M=m, K=k, N=n, density=d, block=b), functools.partial(groups, m, k, n, d, b, args.modes, ctx))
            for m in args.tokens for b in args.block for d in args.density]


def add_arguments(ap, cuda: bool) -> None:
    ap.add_argument("--tokens", nargs="+", type=int, default=[8192] if cuda else [256], help="M values")
    ap.add_argument("--shape", type=parse_kxn, default=(4096, 4096) if cuda else (512, 512), help="KxN (in x out)")
    ap.add_argument("--density", nargs="+", type=float, default=DENSITIES,
                    help="fraction of W's entries (block 1) or of its b x b blocks in the delta")
    ap.add_argument("--block", nargs="+", type=int, default=BLOCKS, help="block sizes (1: unstructured)")


COLUMNS = [("M", "M", "{}"), ("K", "K", "{}"), ("N", "N", "{}"), ("block", "block", "{}"),
           ("density", "density", "{:.3%}"), ("nnz", "values", "{}"), ("mode", "mode", "{}"),
           ("provider", "provider", "{}"), ("ms", "median ms", "{:.3f}"), ("p20", "p20", "{:.3f}"),
           ("p80", "p80", "{:.3f}"), ("vs_linear", "x nn.Linear", "{:.3f}"), ("peak_mib", "peak MiB", "{:.0f}")]


BENCHMARK = harness.Benchmark(
    prog="fastpeft bench sparse", description=__doc__, add_arguments=add_arguments, cases=cases, columns=COLUMNS,
    title="Sparse-delta linear, {dtype}, ratios to frozen nn.Linear in the same run",
    plot_title="Sparse-delta linear ({dtype})",
    no_gpu="No GPU here: the sparse-delta kernels need one (not measured on GPU). Timing the torch ways "
           "(clone + scatter, dense dW + gather) against nn.Linear on the CPU.",
    modes=("fwd", "fwd+bwd"), plot_help="bar chart of the ratios to nn.Linear", progress="bench sparse")


def main(argv=None) -> list:
    return harness.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
