"""Sparse-delta linear ``y = x (W + Δ)^T + b`` (and RoSA: ``+ s (x A^T) B^T``): frozen nn.Linear (the floor)
vs the usual torch ways vs fastpeft.

    fastpeft bench sparse                             # the default grid for this machine
    fastpeft bench sparse --tokens 8192 --shape 4096x4096 --density 0.01 --block 1 32 --json out.json
    fastpeft bench sparse ... --lora-rank 0 16        # 0: the sparse delta alone; r > 0: RoSA, LoRA of rank r beside it
    python benchmarks/bench_sparse.py ...             # the same, from a checkout

Providers:
- ``linear``: frozen nn.Linear (fwd+bwd computes dX only).
- ``reference``: fastpeft's reference backend (what ``backend="auto"`` runs for these ops until they are in
  ``fastpeft.kernels.AUTO_OPS``): on CUDA clone + scatter + F.linear under torch autograd; on the CPU its CPU
  path (``fastpeft.ops.sparse_cpu``: W + Δ in a kept buffer, the values' gradient on Δ's support only, Δ's part
  by gathers at decode sizes).
- ``oracle`` (CPU only): ``fastpeft.reference``'s ``sparse_delta_linear_ref`` / ``lora_sparse_linear_ref``, a
  dense Δ added to W under torch autograd: the test oracle, and what the reference backend ran on the CPU
  before its CPU path.
- ``scatter``: clone W, scatter the values in (``index_add``) and ``F.linear``, all torch autograd (the
  PEFT-SHiRA / RoSA way): backward forms the dense (out, in) gradient of W + Δ and gathers from it.
- ``dense-dW``: a custom autograd.Function (the SpIEL way): the same forward, backward computes
  dW = dY^T X densely in fp32 and gathers the entries' gradients from it.
- ``fastpeft``: the triton backend (CUDA only) with its floor, FASTPEFT_SPARSE_PATH=auto: forward and
  backward each the faster of the kernels and the plain torch composition, timed once per shape bucket;
  RoSA's backward also times ``kernels-dy1`` (LoRA's v and dB from one read of dY). The ``path`` column
  says which ran; what ``backend="auto"`` will run once the ops are in AUTO_OPS. With a cached plan, as a
  layer has.
- ``fastpeft-kernels`` / ``fastpeft-torch``: the two sides of the floor, forced (FASTPEFT_SPARSE_PATH;
  ``kernels`` is the two-shrink kernels composition: ``kernels-dy1`` is not forced, only timed);
  ``fastpeft-fused`` / ``fastpeft-dense`` / on sm_90+ ``fastpeft-tma`` (blocks: each GEMM variant of the kernels
  forced; tma: the TMA GEMM with Δ's blocks as more MMAs, blocks of 16 to 64) and
  ``fastpeft-tile`` / ``fastpeft-gather`` (entries: each SDDMM forced) beside them.

RoSA rows (``--lora-rank r``): every provider but ``linear`` adds the LoRA branch, as plain torch autograd
(``scatter``, ``dense-dW``), the reference or fastpeft's ``lora_sparse_linear``; A and B get gradients too.

Modes: ``fwd`` and ``fwd+bwd`` (W frozen; dX and the values' gradient), each with its peak memory on
CUDA. Ratios are to ``linear`` of the same case, measured in the same run. Every row but nn.Linear and the
reference gives its relative error against ``reference`` (y and every gradient).
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
    out = {"linear": ("linear", {}), "reference": ("reference", {}), "scatter": ("scatter", {}),
           "dense-dW": ("dense-dW", {})}
    if not kernels_ok:  # the CPU: the reference backend runs its CPU path there, not the oracle
        out["oracle"] = ("oracle", {})
    if kernels_ok:
        out["fastpeft"] = ("fastpeft", {"FASTPEFT_SPARSE_PATH": "auto"})
        out["fastpeft-kernels"] = ("fastpeft", {"FASTPEFT_SPARSE_PATH": "kernels"})
        out["fastpeft-torch"] = ("fastpeft", {"FASTPEFT_SPARSE_PATH": "torch"})
        if block > 1:
            out["fastpeft-fused"] = ("fastpeft", {"FASTPEFT_SPARSE_PATH": "kernels", "FASTPEFT_SPARSE_GEMM": "fused"})
            out["fastpeft-dense"] = ("fastpeft", {"FASTPEFT_SPARSE_PATH": "kernels", "FASTPEFT_SPARSE_GEMM": "dense"})
            from fastpeft.kernels import lora_tma
            from fastpeft.kernels import sparse_delta as SD
            if SD.tma_gemm_ok(block) and lora_tma.tma_supported("cuda"):
                out["fastpeft-tma"] = ("fastpeft", {"FASTPEFT_SPARSE_PATH": "kernels", "FASTPEFT_SPARSE_GEMM": "tma"})
        else:
            out["fastpeft-tile"] = ("fastpeft", {"FASTPEFT_SPARSE_PATH": "kernels", "FASTPEFT_SPARSE_SDDMM": "tile"})
            out["fastpeft-gather"] = ("fastpeft", {"FASTPEFT_SPARSE_PATH": "kernels",
                                                   "FASTPEFT_SPARSE_SDDMM": "gather"})
    return out


LORA_SCALING = 2.0


def wrt(kind, x, delta, lora=None) -> list:
    """The tensors a provider's fwd+bwd differentiates: x (linear), and the values (and A, B) for the rest."""
    return [x] if kind == "linear" else [x, delta[1]] + list(lora or ())


def forward_fn(kind, x, lin, delta, plan, lora=None):
    """The forward of provider kind ``kind`` as a zero-argument callable; ``lora``: (A, B) for RoSA."""
    idx, values, flat, which = delta
    block = values.shape[-1] if values.dim() == 3 else 1
    weight, bias = lin.weight, lin.bias
    cpu_plan = None
    if x.device.type == "cpu":
        from fastpeft.ops.sparse_cpu import CPUPlan

        cpu_plan = CPUPlan(idx, weight.shape[0], weight.shape[1], block)

    def torch_lora(y):  # RoSA's LoRA branch in plain torch autograd, added to the torch ways' output
        return y if lora is None else y + LORA_SCALING * F.linear(F.linear(x, lora[0]), lora[1])

    def forward():
        if kind == "linear":
            return lin(x)
        if kind == "scatter":
            return torch_lora(scatter_linear(x, weight, bias, values, flat, which))
        if kind == "dense-dW":
            return torch_lora(DenseGradGather.apply(x, weight, bias, values, flat, which))
        if kind == "oracle":
            if lora is not None:
                return fastpeft.reference.lora_sparse_linear_ref(x, weight, bias, lora[0], lora[1], LORA_SCALING, idx,
                                                                 values, block)
            return fastpeft.reference.sparse_delta_linear_ref(x, weight, bias, idx, values, block)
        backend = "reference" if kind == "reference" else "triton"
        # the plan built once per set of indices, as a layer keeps it: the triton one, or the CPU path's CPUPlan
        use = plan if backend == "triton" else cpu_plan
        if lora is not None:
            return fastpeft.functional.lora_sparse_linear(x, weight, bias, lora[0], lora[1], LORA_SCALING, idx,
                                                          values, block, backend=backend, check=False, plan=use)
        return fastpeft.functional.sparse_delta_linear(x, weight, bias, idx, values, block, backend=backend,
                                                       check=False, plan=use)
    return forward


def step_fn(kind, envs, mode, x, lin, delta, plan, dy, lora=None):
    """One timed call: forward, or forward + dX and the values' gradient (and A's and B's with ``lora``,
    ``(A, B)``: RoSA); it returns y, or y and those gradients."""
    forward = forward_fn(kind, x, lin, delta, plan, lora)
    inputs = wrt(kind, x, delta, lora)

    def fn():
        with env_vars(envs):
            y = forward()
            if mode == "fwd+bwd":
                return (y,) + torch.autograd.grad(y, inputs, dy)
            return y
    return fn


def chosen_path(m, k, n, b, nblocks, rank) -> str | None:
    """What the floor of the ``fastpeft`` provider ran in this case, e.g. "fwd torch, bwd kernels"."""
    from fastpeft.ops.sparse import chosen_paths

    got = chosen_paths(m, k, n, b, nblocks, rank)
    words = [f"{way} {'/'.join(sorted(c))}" for way, c in got.items() if c]
    return ", ".join(words) or None


def groups(m, k, n, d, b, r, modes, ctx):
    """One case's layer, inputs and delta (and the kernels' plan), built once; one group per mode."""
    device, dtype = ctx.device, ctx.dtype
    torch.manual_seed(0)
    lin = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    idx, values, flat, which = make_delta(n, k, d, b, device, dtype)
    values.requires_grad_()
    lora = None
    if r:
        lora = ((torch.randn(r, k, device=device, dtype=dtype) / k ** 0.5).requires_grad_(),
                (torch.randn(n, r, device=device, dtype=dtype) / r ** 0.5).requires_grad_())
    plan = None
    if ctx.kernels_ok:
        from fastpeft.ops.sparse import build_sparse_plan

        plan = build_sparse_plan(idx, n, k, b)  # built once per set of indices, as a layer caches it
    for mode in modes:
        calls = {name: step_fn(kind, envs, mode, x, lin, (idx, values, flat, which), plan, dy, lora)
                 for name, (kind, envs) in providers(b, ctx.kernels_ok).items()}

        def extra(name, times):
            # r and p: the column names of the earlier tables' JSON (block and density), kept for readers of
            # benchmarks/results; the LoRA rank of RoSA rows is lora_r.
            out = dict(r=b, p=d)
            if name == "fastpeft":
                out["path"] = chosen_path(m, k, n, b, idx.shape[0], r)
            return out
        # every way but nn.Linear computes y = x (W + Δ)^T + b [+ RoSA's LoRA]: each against the reference
        checks = {name: "reference" for name in calls if name not in ("linear", "reference")}
        yield Group({"nnz": values.numel(), "mode": mode}, calls, extra=extra, checks=checks)


def cases(args, ctx) -> list:
    """Every (tokens, LoRA rank, block, density) of the options, on the one shape."""
    k, n = args.shape
    return [Case(dict(M=m, K=k, N=n, lora_r=r, density=d, block=b),
                 functools.partial(groups, m, k, n, d, b, r, args.modes, ctx))
            for m in args.tokens for r in args.lora_rank for b in args.block for d in args.density]


def add_arguments(ap, cuda: bool) -> None:
    ap.add_argument("--tokens", nargs="+", type=harness.positive_int, default=[8192] if cuda else [256],
                    help="M values")
    ap.add_argument("--shape", "--shapes", dest="shape", type=parse_kxn,
                    default=(4096, 4096) if cuda else (512, 512), help="KxN (in x out): one shape")
    ap.add_argument("--density", nargs="+", type=harness.fraction, default=DENSITIES,
                    help="fraction of W's entries (block 1) or of its b x b blocks in the delta")
    ap.add_argument("--block", nargs="+", type=harness.positive_int, default=BLOCKS,
                    help="block sizes (1: unstructured)")
    ap.add_argument("--lora-rank", nargs="+", type=harness.non_negative_int, default=[0],
                    help="0: the sparse delta alone; r > 0: RoSA, a LoRA of rank r beside it (lora_sparse_linear)")


COLUMNS = (harness.plain_columns("M", "K", "N") + [("lora_r", "LoRA r", "{}"), ("block", "block", "{}"),
                                                   ("density", "density", "{:.3%}"), ("nnz", "values", "{}")]
           + harness.plain_columns("mode") + harness.TIMING_COLUMNS + harness.VS_LINEAR_COLUMNS
           + [("path", "path (floor)", "{}")] + harness.ERROR_COLUMNS)


BENCHMARK = harness.linear_benchmark(
    prog="fastpeft bench sparse", description=__doc__, add_arguments=add_arguments, cases=cases, columns=COLUMNS,
    title="Sparse-delta linear (LoRA r > 0: RoSA), {dtype}, ratios to frozen nn.Linear in the same run",
    plot_title="Sparse-delta linear ({dtype})",
    no_gpu="No GPU here: the sparse-delta kernels need one (not measured on GPU). Timing the torch ways "
           "(the reference, clone + scatter, dense dW + gather) against nn.Linear on the CPU.",
    progress="bench sparse")


def main(argv=None) -> list:
    return harness.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
