"""LoRA linear layer: frozen nn.Linear (the floor) vs fastpeft vs the eager reference vs PEFT.

    fastpeft bench                                    # the default grid for this machine
    fastpeft bench --tokens 2048 --shapes 4096x4096 --ranks 16 --dropout 0.1 --json out.json --plot out.png
    python benchmarks/bench_lora.py ...               # the same, from a checkout

Providers: ``linear`` (frozen nn.Linear), ``fastpeft`` (FastLoRALinear on the default backend: the
fused kernels on CUDA, with the fused-epilogue / cuBLAS choice measured per shape), ``fastpeft-fused``
and ``fastpeft-cublas`` (each GEMM variant forced; on sm_90+ also ``fastpeft-tma-shrink``, the forward's
shrink fused into the TMA GEMM, its backward on the TMA GEMM; up to 64 rows ``fastpeft-decode``, the forward
in one launch, its backward on the kernels), ``reference`` (FastLoRALinear on the PyTorch
path, i.e. eager LoRA), ``peft`` (a PEFT LoRA layer) and ``peft+accelerate`` (the same PEFT model
patched by ``fastpeft.accelerate``) when PEFT is installed, both with the adapter in the benchmark's
dtype; in bf16 / fp16 also ``peft-fp32-adapters`` and ``peft-fp32-adapters+accelerate``, PEFT's own default
there (fp32 adapters, which accelerate casts to the base's dtype per call). Modes: ``fwd`` and ``fwd+bwd``
(frozen W; dX, dA, dB computed), each with its peak memory on
CUDA. Ratios are to ``linear`` of the same shape and mode, measured in the same run. Without dropout each
fastpeft row also gives its relative error against ``reference`` (y and every gradient; ``peft+accelerate``'s
against ``peft``): ~1e-3 to 1e-2 in bf16, ~1 for a path that computes something else.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Group, env_vars  # noqa: E402

import fastpeft  # noqa: E402

GPU_TOKENS = [512, 2048, 8192]
GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
GPU_RANKS = [8, 16, 64]
CPU_TOKENS = [256, 1024]
CPU_SHAPES = [(512, 512), (1024, 1024)]
CPU_RANKS = [16]


def providers(in_f, out_f, r, p, device, dtype, kernels_ok: bool, m: int | None = None):
    """name -> (module, backend or None, FASTPEFT_LORA_GEMM value or None); ``m``: the rows, which decide
    whether ``fastpeft-decode`` (the one-launch forward, up to ``DENSE_MAX_M`` rows) is a provider."""
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    layer = fastpeft.FastLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)
    out = {"linear": (lin, None, None)}
    if kernels_ok:
        out["fastpeft"] = (layer, "triton", None)
        out["fastpeft-fused"] = (layer, "triton", "fused")
        out["fastpeft-cublas"] = (layer, "triton", "cublas")
        from fastpeft.kernels import lora_tma
        if lora_tma.tma_supported(device) and lora_tma.shrink_fits(r) and in_f % 8 == 0 and out_f % 8 == 0:
            out["fastpeft-tma-shrink"] = (layer, "triton", "tma-shrink")
        from fastpeft.kernels.quant import DENSE_MAX_M
        if m is not None and m <= DENSE_MAX_M:
            out["fastpeft-decode"] = (layer, "triton", "decode")
    out["reference"] = (layer, "reference", None)
    try:
        import peft  # noqa: F401
    except ImportError:
        return out
    out["peft"] = (peft_provider(in_f, out_f, r, p, device, dtype), None, None)
    out["peft+accelerate"] = (peft_accelerate_provider(in_f, out_f, r, p, device, dtype), None, None)
    if dtype in (torch.bfloat16, torch.float16):  # PEFT's own default there: fp32 adapters on the half base
        out["peft-fp32-adapters"] = (peft_provider(in_f, out_f, r, p, device, dtype, True), None, None)
        out["peft-fp32-adapters+accelerate"] = (peft_accelerate_provider(in_f, out_f, r, p, device, dtype, True),
                                                None, None)
    return out


def peft_provider(in_f, out_f, r, p, device, dtype, fp32_adapters: bool = False):
    """A PEFT LoRA model of one Linear. ``autocast_adapter_dtype=False`` keeps the adapter in ``dtype`` (PEFT
    would hold a bf16 model's adapter in fp32), so every provider computes in the same dtype; ``fp32_adapters``:
    PEFT's default instead (its branch computed in fp32)."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f, device=device, dtype=dtype))
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False)
    return peft.get_peft_model(base, cfg, autocast_adapter_dtype=fp32_adapters)


def peft_accelerate_provider(in_f, out_f, r, p, device, dtype, fp32_adapters: bool = False):
    """The PEFT model of ``peft_provider`` with its LoRA layer computing through fastpeft
    (``fastpeft.accelerate``, strict: it raises rather than leave the layer on PEFT's forward; fp32 adapters are
    cast to ``dtype`` per call)."""
    model = peft_provider(in_f, out_f, r, p, device, dtype, fp32_adapters)
    fastpeft.accelerate(model, strict=True)
    return model


def step_fn(mod, backend, gemm, mode, x, dy):
    """One timed call (``harness.layer_step``) with the LoRA GEMM ``gemm`` forced (None: auto)."""
    return harness.layer_step(mod, backend, mode, x, dy, lambda: env_vars({"FASTPEFT_LORA_GEMM": gemm or "auto"}))


def groups(m, k, n, r, p, modes, ctx):
    """One case's inputs and providers, built once; one group per mode."""
    x = torch.randn(m, k, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    dy = torch.randn(m, n, device=ctx.device, dtype=ctx.dtype)
    mods = providers(k, n, r, p, ctx.device, ctx.dtype, ctx.kernels_ok, m)
    for mode in modes:
        def budget(name, times, mode=mode):
            if name != "fastpeft" or mode != "fwd+bwd" or times[name].peak_mib is None:
                return {}
            # The memory target: nn.Linear's peak + the LoRA parameters and their grads + 2 M r fp32.
            extra = (2 * r * (k + n) * x.element_size() + 2 * m * r * 4) / 2**20
            return {"mem_budget_mib": times["linear"].peak_mib + extra}

        calls = {name: step_fn(mod, be, gemm, mode, x, dy) for name, (mod, be, gemm) in mods.items()}
        yield Group({"mode": mode}, calls, extra=budget, checks=checks(mods, p))


def checks(mods: dict, p: float) -> dict:
    """Which rows are checked against which (``Group.checks``): every fastpeft path against the reference path of
    the same layer, and PEFT patched by ``fastpeft.accelerate`` against PEFT (both built from one seed). Without
    dropout only: with it every call draws its own mask."""
    if p:
        return {}
    out = {name: "reference" for name in mods if name.startswith("fastpeft")}
    for name in ("peft+accelerate", "peft-fp32-adapters+accelerate"):
        if name in mods:
            out[name] = name.split("+")[0]
    return out


def cases(args, ctx) -> list:
    """Every (tokens, shape, rank, dropout) of the options."""
    return harness.linear_cases(args, ctx, groups)


def add_arguments(ap, cuda: bool) -> None:
    harness.add_linear_args(ap, cuda, (GPU_TOKENS, CPU_TOKENS), (GPU_SHAPES, CPU_SHAPES))
    ap.add_argument("--ranks", nargs="+", type=harness.positive_int, default=GPU_RANKS if cuda else CPU_RANKS)
    ap.add_argument("--dropout", nargs="+", type=harness.rate, default=[0.0, 0.1])


COLUMNS = (harness.plain_columns("M", "K", "N", "r", "p", "mode") + harness.TIMING_COLUMNS + harness.VS_LINEAR_COLUMNS
           + [("mem_budget_mib", "MiB budget", "{:.0f}")] + harness.ERROR_COLUMNS)

BENCHMARK = harness.linear_benchmark(
    prog="fastpeft bench lora", description=__doc__, add_arguments=add_arguments, cases=cases, columns=COLUMNS,
    title="LoRA linear, {dtype}, ratios to frozen nn.Linear in the same run", plot_title="LoRA linear ({dtype})",
    no_gpu="No GPU here: the fused kernels need one (not measured on GPU). Timing the eager reference and PEFT "
           "against nn.Linear on the CPU.")


def main(argv=None) -> list:
    return harness.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
