"""DoRA linear layer: frozen nn.Linear (the floor) vs fastpeft LoRA vs fastpeft DoRA vs PEFT's DoRA.

    fastpeft bench dora                                   # the default grid for this machine
    fastpeft bench dora --tokens 2048 --shapes 1024x1024 --ranks 16 --dtype float32 --markdown out.md
    python benchmarks/bench_dora.py ...                   # the same, from a checkout

Providers: ``linear`` (frozen nn.Linear), ``fastpeft-lora`` (FastLoRALinear, default backend: what DoRA
should cost), ``fastpeft-dora`` (FastLoRALinear(use_dora=True) on the default backend: the PyTorch path that
never forms W + sBA, with ‖W‖² cached), ``fastpeft-dora-triton`` (the fused kernels, where they run),
``peft-dora`` (PEFT's DoRA layer: W + sBA rebuilt in fp32 every call) and ``peft-dora-cached`` (forward only:
PEFT's ``DoraCaching``, which caches the norm in eval mode only). Modes ``fwd`` and ``fwd+bwd`` (frozen W; dX,
dA, dB, dm computed), each with its peak memory on CUDA. Ratios are to ``linear`` of the same shape and mode,
measured in the same run. PEFT's layers get fastpeft's A, B and magnitude, and without dropout each fastpeft
DoRA row gives its relative error against ``peft-dora`` (y and every gradient).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Group  # noqa: E402

import fastpeft  # noqa: E402

GPU_TOKENS = [8192]
GPU_SHAPES = [(4096, 4096)]
GPU_RANKS = [16]
CPU_TOKENS = [2048]
CPU_SHAPES = [(1024, 1024)]
CPU_RANKS = [16]


def _peft_dora(in_f, out_f, r, p, device, dtype, cached: bool):
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f, device=device, dtype=dtype))
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False,
                          use_dora=True)
    model = peft.get_peft_model(base, cfg)
    if not cached:
        return model, contextlib.nullcontext
    from peft.helpers import DoraCaching

    return model.eval(), functools.partial(DoraCaching, True)  # PEFT caches in eval mode only


def providers(in_f, out_f, r, p, mode, device, dtype, kernels_ok: bool):
    """name -> (module, backend or None, context factory)."""
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    kw = dict(r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)
    lora = fastpeft.FastLoRALinear.from_linear(lin, **kw)
    dora = fastpeft.FastLoRALinear.from_linear(lin, use_dora=True, **kw)
    none = contextlib.nullcontext
    out = {"linear": (lin, None, none), "fastpeft-lora": (lora, None, none), "fastpeft-dora": (dora, None, none)}
    if kernels_ok:
        out["fastpeft-dora-triton"] = (dora, "triton", none)
    try:
        import peft  # noqa: F401
    except ImportError:
        return out
    out["peft-dora"] = (_same_adapter(_peft_dora(in_f, out_f, r, p, device, dtype, cached=False)[0], dora), None, none)
    if mode == "fwd":
        model, ctx = _peft_dora(in_f, out_f, r, p, device, dtype, cached=True)
        out["peft-dora-cached"] = (_same_adapter(model, dora), None, ctx)
    return out


def _same_adapter(model, dora):
    """``model`` (a PEFT DoRA model of one Linear, built from the same seed: the same W and bias) with fastpeft's
    A, B and magnitude copied in, so that the two compute the same function (``checks``)."""
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(dora.lora_A)
        layer.lora_B["default"].weight.copy_(dora.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(dora.magnitude())
    return model


def checks(mods: dict, p: float) -> dict:
    """Which rows are checked against PEFT's DoRA (``Group.checks``; y and every gradient): fastpeft's DoRA rows
    and PEFT's cached forward. Without dropout only: with it every call draws its own mask."""
    if p or "peft-dora" not in mods:
        return {}
    return {name: "peft-dora" for name in mods if name.startswith("fastpeft-dora") or name == "peft-dora-cached"}


def groups(m, k, n, r, p, modes, ctx):
    """One case's inputs and providers; one group per mode."""
    x = torch.randn(m, k, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    dy = torch.randn(m, n, device=ctx.device, dtype=ctx.dtype)
    for mode in modes:
        mods = providers(k, n, r, p, mode, ctx.device, ctx.dtype, ctx.kernels_ok)
        calls = {name: harness.layer_step(mod, be, mode, x, dy, c) for name, (mod, be, c) in mods.items()}
        yield Group({"mode": mode}, calls, checks=checks(mods, p))


def cases(args, ctx) -> list:
    return harness.linear_cases(args, ctx, groups)


def add_arguments(ap, cuda: bool) -> None:
    harness.add_linear_args(ap, cuda, (GPU_TOKENS, CPU_TOKENS), (GPU_SHAPES, CPU_SHAPES))
    ap.add_argument("--ranks", nargs="+", type=harness.positive_int, default=GPU_RANKS if cuda else CPU_RANKS)
    ap.add_argument("--dropout", nargs="+", type=harness.rate, default=[0.0])


COLUMNS = (harness.plain_columns("M", "K", "N", "r", "p", "mode") + harness.TIMING_COLUMNS + harness.VS_LINEAR_COLUMNS
           + harness.ERROR_COLUMNS)

BENCHMARK = harness.linear_benchmark(
    prog="fastpeft bench dora", description=__doc__, add_arguments=add_arguments, cases=cases, columns=COLUMNS,
    title="DoRA linear, {dtype}, ratios to frozen nn.Linear in the same run", plot_title="DoRA linear ({dtype})",
    no_gpu="No GPU here: timing fastpeft's PyTorch DoRA path (no W + sBA formed) and PEFT's DoRA against "
           "nn.Linear on the CPU; peak memory is measured on CUDA only.")


def main(argv=None) -> list:
    return harness.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
