"""LoRA on convolutions (PEFT's ``lora.Conv2d``): PEFT against fastpeft's ``FastLoRAConv`` and PEFT + accelerate.

    fastpeft bench conv                                   # the default grid for this machine
    fastpeft bench conv --shapes 8x64x64x56x3 --ranks 16 --dropout 0 0.1 --markdown out.md
    fastpeft bench conv --dora                            # DoRA (PEFT's DoraConv2d layers) instead of LoRA
    python benchmarks/bench_conv.py ...                   # the same, from a checkout

One ``nn.Conv2d`` (O x C, k x k, padding k // 2) on x (N, C, H, H); shapes ``NxCxOxHxk``. Providers: ``conv`` (the
frozen convolution alone: the baseline of every ratio), ``peft`` (PEFT's ``lora.Conv2d``: conv(x, W) + s
B(A(drop(x))), autograd keeping drop(x)), ``peft+accelerate`` (the same PEFT model after ``fastpeft.accelerate``),
``fastpeft`` (``fastpeft.inject``'s ``FastLoRAConv``). Both fastpeft rows run ``fastpeft.lora_conv``: no dropped copy
of x kept, and ``W + s B A`` folded into one convolution where that is cheaper than the rank-r one (no-grad calls;
the input gradient without dropout). Modes ``fwd`` (no grad: inference), ``fwd+bwd`` (gradients of x and the LoRA
factors). Without dropout the fastpeft rows give their relative error against PEFT's (y and every gradient).
``--dora``: every provider with DoRA adapters (``fastpeft.dora_conv``: the norm factored, the low-rank part on
``lora_conv``'s Function without dropout; PEFT forms ``B A`` and ``W + s B A`` at every call).
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Group  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft._cli import positive_int, rate  # noqa: E402

# (N, C, O, H, k): a ResNet-50 stage-1 3x3, an SD-1.5 UNet 320-channel 3x3 at 64x64, its 1280-channel 3x3 at 16x16,
# a 1x1 projection
GPU = dict(shapes=[(32, 64, 64, 56, 3), (8, 320, 320, 64, 3), (8, 1280, 1280, 16, 3), (32, 512, 512, 28, 1)],
           ranks=[16], dropout=[0.0, 0.1])
CPU = dict(shapes=[(8, 64, 64, 56, 3), (2, 320, 320, 64, 3), (4, 1280, 1280, 16, 3), (4, 512, 512, 32, 1)],
           ranks=[16], dropout=[0.0, 0.1])


def parse_shape(text: str) -> tuple:
    """``NxCxOxHxk`` -> (N, C, O, H, k), each a positive int."""
    parts = text.lower().split("x")
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected NxCxOxHxk (five positive ints, e.g. 8x64x64x56x3), got {text!r}")
    return tuple(int(p) for p in parts)


class _One(nn.Module):
    def __init__(self, c, o, k, device, dtype):
        super().__init__()
        self.conv = nn.Conv2d(c, o, k, padding=k // 2, device=device, dtype=dtype)

    def forward(self, x):
        return self.conv(x)


def providers(c, o, k, r, p, dora, device, dtype) -> dict:
    import peft

    torch.manual_seed(0)
    base = _One(c, o, k, device, dtype).requires_grad_(False)
    cfg = dict(r=r, lora_alpha=2 * r, target_modules=["conv"], lora_dropout=p, init_lora_weights=False, use_dora=dora)
    torch.manual_seed(1)
    slow = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    accelerated = copy.deepcopy(slow)
    fastpeft.accelerate(accelerated, strict=True)
    ours = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    layer = slow.base_model.model.conv
    with torch.no_grad():
        ours.conv.lora_A.copy_(layer.lora_A["default"].weight)
        ours.conv.lora_B.copy_(layer.lora_B["default"].weight)
        if dora:
            ours.conv.magnitude().copy_(layer.lora_magnitude_vector["default"].weight)
    return {"conv": base, "peft": slow, "peft+accelerate": accelerated, "fastpeft": ours}


def groups(shape, r, p, modes, dora, ctx):
    """One case's inputs and providers; one group per mode."""
    n, c, o, h, k = shape
    mods = providers(c, o, k, r, p, dora, ctx.device, ctx.dtype)
    x = torch.randn(n, c, h, h, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    dy = torch.randn(n, o, h, h, device=ctx.device, dtype=ctx.dtype)
    for mode in modes:
        calls = {}
        for name, mod in mods.items():
            mod.train(mode == "fwd+bwd")
            step = harness.layer_step(mod, None, mode, x, dy)
            calls[name] = step if mode == "fwd+bwd" else functools.partial(_no_grad, step)
        checks = {"fastpeft": "peft", "peft+accelerate": "peft"} if p == 0.0 else {}
        yield Group({"mode": mode}, calls, checks=checks)


def _no_grad(step):
    with torch.no_grad():
        return step()


def cases(args, ctx) -> list:
    return [Case(dict(adapter="DoRA" if args.dora else "LoRA", N=s[0], C=s[1], O=s[2], H=s[3], k=s[4], r=r, p=p),
                 functools.partial(groups, s, r, p, args.modes, args.dora, ctx))
            for s in args.shapes for r in args.ranks for p in args.dropout]


def add_arguments(ap, cuda: bool) -> None:
    d = GPU if cuda else CPU
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=d["shapes"],
                    help="NxCxOxHxk: batch, in channels, out channels, height = width, kernel size")
    ap.add_argument("--ranks", nargs="+", type=positive_int, default=d["ranks"])
    ap.add_argument("--dropout", nargs="+", type=rate, default=d["dropout"], help="LoRA dropout rates")
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True) instead of LoRA")


COLUMNS = (harness.plain_columns("adapter", "N", "C", "O", "H", "k", "r", "p", "mode") + harness.TIMING_COLUMNS
           + [("vs_conv", "x conv", "{:.3f}"), ("peak_mib", "peak MiB", "{:.0f}")] + harness.ERROR_COLUMNS)

BENCHMARK = harness.Benchmark(
    prog="fastpeft bench conv", description=__doc__, add_arguments=add_arguments, cases=cases, columns=COLUMNS,
    title="LoRA / DoRA on nn.Conv2d, {dtype}, ratios to the frozen convolution in the same run",
    plot_title="LoRA / DoRA on Conv2d ({dtype})", modes=("fwd", "fwd+bwd"),
    no_gpu="No GPU here: timing PEFT's lora.Conv2d and fastpeft.lora_conv (torch's oneDNN convolutions) against "
           "the convolution on the CPU; peak memory is measured on CUDA only.",
    baseline="conv", plot_help="bar chart of the ratios to the convolution", progress="bench conv")


def main(argv=None) -> list:
    return harness.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
