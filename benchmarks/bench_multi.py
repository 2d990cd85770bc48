"""Many adapters in one batch (serving): each row / sequence brings its own adapter.

    fastpeft bench multi                              # the default grid for this machine
    fastpeft bench multi --decode 1 64 --prefill 8192 --adapters 1 64 --ranks mixed --json out.json

Providers (forward only, as in serving): ``single`` (FastLoRALinear with one adapter applied to all
rows: the floor), ``fastpeft`` (n adapters routed per row by ``forward(x, adapter_ids)`` on the default
backend: on CUDA the kernels' no-grad forward, its timed choice of BGMV or grouped), at decode
``fastpeft-bgmv`` and ``fastpeft-grouped`` (the same with ``FASTPEFT_MULTI_PATH`` forcing the BGMV kernel,
base GEMM + 1 launch, or the grouped kernels), at prefill ``fastpeft-grouped`` and on sm_90+ ``fastpeft-fused``
(forcing the grouped kernels or the one fused TMA kernel, which ``auto`` times against each other for
per-sequence ids), ``reference`` (the same on the PyTorch loop), and ``peft`` (a
PEFT LoRA layer with n adapters and ``adapter_names``) when installed. Decode: M tokens, one per
sequence, each with a random adapter. Prefill: M tokens in sequences of 512, one adapter per sequence.
Ratios are to ``single`` of the same case, measured in the same run; ``peft / fastpeft`` is PEFT's
time over fastpeft's. Each fastpeft row gives its relative error against ``reference``.
"""
from __future__ import annotations

import functools
import os
import random
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Group, env_vars, parse_kxn  # noqa: E402

import fastpeft  # noqa: E402

SEQ = 512
RANK_SETS = {"16": [16], "mixed": [8, 16, 32, 64]}


def build(k, n, n_adapters, ranks, device, dtype):
    """A FastLoRALinear with n adapters (ranks cycling through ``ranks``) and the same adapters in PEFT."""
    torch.manual_seed(0)
    lin = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
    layer = fastpeft.FastLoRALinear.from_linear(lin, r=ranks[0], lora_alpha=2 * ranks[0], init_lora_weights=False,
                                                adapter_name="a0")
    for i in range(1, n_adapters):
        r = ranks[i % len(ranks)]
        layer.add_adapter(f"a{i}", r, 2 * r, init_lora_weights=False)
    layer.eval().requires_grad_(False)
    single = fastpeft.FastLoRALinear.from_linear(nn.Linear(k, n, device=device, dtype=dtype), r=ranks[0],
                                                 lora_alpha=2 * ranks[0], init_lora_weights=False).eval()
    single.requires_grad_(False)
    peft_model = None
    try:
        import peft
    except ImportError:
        return layer, single, peft_model
    base = nn.Sequential(nn.Linear(k, n, device=device, dtype=dtype))
    for i in range(n_adapters):
        r = ranks[i % len(ranks)]
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
        if peft_model is None:
            peft_model = peft.get_peft_model(base, cfg, adapter_name="a0")
        else:
            peft_model.add_adapter(f"a{i}", cfg)
    peft_model.eval().requires_grad_(False)
    with torch.no_grad():  # the same weights as ``layer``, so that PEFT's row is checked against it too
        lora = peft_model.base_model.model[0]
        lora.base_layer.weight.copy_(lin.weight)
        lora.base_layer.bias.copy_(lin.bias)
        for i in range(n_adapters):
            a, b = layer.adapter_parameters(f"a{i}")
            lora.lora_A[f"a{i}"].weight.copy_(a)
            lora.lora_B[f"a{i}"].weight.copy_(b)
    return layer, single, peft_model


def groups(phase, m, na, rs, k, n, rng, ctx):
    """One case: the layers, the batch and its adapter per row / sequence; one group, timed without grad."""
    device, dtype = ctx.device, ctx.dtype
    layer, single, peft_model = build(k, n, na, RANK_SETS[rs], device, dtype)
    if phase == "decode":
        x = torch.randn(m, 1, k, device=device, dtype=dtype)
        names = [f"a{rng.randrange(na)}" for _ in range(m)]
    else:
        seqs = max(1, m // SEQ)
        x = torch.randn(seqs, m // seqs, k, device=device, dtype=dtype)
        names = [f"a{i % na}" for i in range(seqs)]
    ids = torch.tensor([int(s[1:]) for s in names], device=device)
    calls = {"single": lambda: single(x)}

    def ours(path):
        def call():
            with env_vars({"FASTPEFT_MULTI_PATH": path}):
                return layer(x, adapter_ids=ids)
        return call
    if ctx.kernels_ok:
        calls["fastpeft"] = ours("auto")
        if phase == "decode":  # both paths of the no-grad forward, forced
            calls["fastpeft-bgmv"] = ours("bgmv")
            calls["fastpeft-grouped"] = ours("grouped")
        else:  # the grouped kernels and, on sm_90+, the fused TMA kernel (auto times both for per-sequence ids)
            calls["fastpeft-grouped"] = ours("grouped")
            from fastpeft.kernels import lora_tma
            if lora_tma.tma_supported(device) and max(RANK_SETS[rs]) <= 64:
                calls["fastpeft-fused"] = ours("fused")

    def ref():
        with fastpeft.use_backend("reference"):
            return layer(x, adapter_ids=ids)
    calls["reference"] = ref
    if peft_model is not None:
        calls["peft"] = lambda: peft_model(x, adapter_names=names)

    def extra(name, times):
        floor, ours = times["single"].median_ms, times.get("fastpeft", times["reference"]).median_ms
        return dict(peft_over_ours=(times["peft"].median_ms / ours) if "peft" in times else None,
                    # the column names of the earlier tables' JSON, kept for readers of benchmarks/results
                    r=rs, p=na, mode=phase, vs_linear=times[name].median_ms / floor)
    # every fastpeft path of the layer, and PEFT's adapter_names (the same weights), against its PyTorch path
    yield Group({}, calls, extra=extra, grad=False,
                checks={name: "reference" for name in calls if name.startswith("fastpeft") or name == "peft"})


def cases(args, ctx) -> list:
    """Decode and prefill token counts x adapter counts x rank sets; adapters drawn from one seeded rng."""
    if not args.decode and not args.prefill:
        raise SystemExit("fastpeft bench multi: --decode and --prefill are both empty: nothing to time")
    k, n = args.shape
    rng = random.Random(0)
    return [Case(dict(phase=phase, M=m, K=k, N=n, adapters=na, ranks=rs),
                 functools.partial(groups, phase, m, na, rs, k, n, rng, ctx))
            for phase, ms in (("decode", args.decode), ("prefill", args.prefill)) for m in ms
            for na in args.adapters for rs in args.ranks]


def add_arguments(ap, cuda: bool) -> None:
    ap.add_argument("--decode", nargs="*", type=harness.positive_int, default=[1, 16, 64, 256] if cuda else [1, 16, 64],
                    help="decode batch sizes (tokens)")
    ap.add_argument("--prefill", nargs="*", type=harness.positive_int, default=[8192] if cuda else [1024],
                    help="prefill tokens")
    ap.add_argument("--adapters", nargs="+", type=harness.positive_int, default=[1, 8, 64] if cuda else [1, 8])
    ap.add_argument("--ranks", nargs="+", choices=list(RANK_SETS), default=list(RANK_SETS))
    ap.add_argument("--shape", "--shapes", dest="shape", type=parse_kxn,
                    default=(4096, 4096) if cuda else (512, 512), help="KxN: one shape")


COLUMNS = (harness.plain_columns("phase", "M", "K", "N", "adapters", "ranks") + harness.TIMING_COLUMNS
           + [("vs_single", "x single", "{:.3f}"), ("peft_over_ours", "peft/fastpeft", "{:.1f}")]
           + harness.ERROR_COLUMNS)

BENCHMARK = harness.Benchmark(
    prog="fastpeft bench multi", description=__doc__, add_arguments=add_arguments, cases=cases, columns=COLUMNS,
    title="Many adapters per batch, {dtype}, ratios to one adapter on the same rows",
    plot_title="Many adapters ({dtype})",
    no_gpu="No GPU here: the grouped kernels need one (not measured on GPU). Timing the reference loop and PEFT "
           "against a single adapter on the CPU.",
    baseline="single", plot_help="bar chart of the ratios to one adapter", progress="bench multi")


def main(argv=None) -> list:
    return harness.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
