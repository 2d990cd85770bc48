"""LoRA on a mixture of experts' expert weights (PEFT's ``target_parameters``): PEFT against fastpeft.accelerate.

    fastpeft bench moe                                    # the default grid for this machine
    fastpeft bench moe --tokens 16 2048 --experts 64 --top-k 4 --shapes 1024x512 --ranks 16 --markdown out.md
    python benchmarks/bench_moe.py ...                    # the same, from a checkout

One transformers Qwen3-MoE experts module (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), SiLU gate; its
default ``grouped_mm`` implementation) routes T tokens to their top-k of E experts (routing drawn once per case).
Providers: ``experts`` (the frozen module alone, no LoRA: the baseline of every ratio), ``peft`` (LoRA on both
expert weights through PEFT's ``ParamWrapper``: W + s B A formed for every expert at each call), ``fastpeft``
(the same PEFT model after ``fastpeft.accelerate``: ``fastpeft.lora_experts``, each expert's routed rows only).
Modes ``fwd`` and ``fwd+bwd`` (gradients of the tokens and the LoRA factors), peak memory on CUDA. The fastpeft
row gives its relative error against PEFT's (y and every gradient). Shapes: ``--shapes HxI`` (hidden x expert
intermediate size).
"""
from __future__ import annotations

import copy
import functools
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Group, parse_kxn  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft._cli import positive_int  # noqa: E402

GPU = dict(tokens=[16, 8192], experts=128, top_k=8, shapes=[(2048, 768)], ranks=[16])  # Qwen3-30B-A3B's layer
CPU = dict(tokens=[16, 256, 2048], experts=64, top_k=4, shapes=[(1024, 512)], ranks=[16])


class Routed(nn.Module):
    """An experts module called on a fixed routing: ``forward(x)`` = ``experts(x, top_k_index, top_k_weights)``."""

    def __init__(self, experts: nn.Module, index: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        self.experts, self.index, self.weights = experts, index, weights

    def forward(self, x):
        return self.experts(x, self.index, self.weights)


def experts_module(h: int, i: int, n_exp: int, device, dtype):
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = transformers.Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=n_exp)
    cfg._experts_implementation = "grouped_mm"  # (transformers' default for the model)
    torch.manual_seed(0)
    ex = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        nn.init.normal_(ex.gate_up_proj, std=h ** -0.5)
        nn.init.normal_(ex.down_proj, std=i ** -0.5)
    return ex.to(device=device, dtype=dtype).requires_grad_(False)


def providers(t, h, i, n_exp, k, r, device, dtype) -> dict:
    import peft

    g = torch.Generator(device="cpu").manual_seed(1)
    weights, index = torch.topk(torch.randn(t, n_exp, generator=g).softmax(-1), k)
    weights = (weights / weights.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
    base = Routed(experts_module(h, i, n_exp, device, dtype), index.to(device), weights)
    cfg = dict(r=r, lora_alpha=2 * r, target_modules=[], init_lora_weights=False,
               target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    torch.manual_seed(2)
    slow = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    fast = copy.deepcopy(slow)
    report = fastpeft.accelerate(fast, strict=True)
    assert len(report.patched) == 2, report
    return {"experts": base, "peft": slow, "fastpeft": fast}


def groups(t, h, i, r, modes, args, ctx):
    """One case's inputs and providers; one group per mode."""
    mods = providers(t, h, i, args.experts, args.top_k, r, ctx.device, ctx.dtype)
    x = torch.randn(t, h, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    dy = torch.randn(t, h, device=ctx.device, dtype=ctx.dtype)
    for mode in modes:
        calls = {name: harness.layer_step(mod, None, mode, x, dy) for name, mod in mods.items()}
        yield Group({"mode": mode}, calls, checks={"fastpeft": "peft"})


def cases(args, ctx) -> list:
    return [Case(dict(T=t, E=args.experts, k=args.top_k, H=h, I=i, r=r),
                 functools.partial(groups, t, h, i, r, args.modes, args, ctx))
            for t in args.tokens for h, i in args.shapes for r in args.ranks]


def add_arguments(ap, cuda: bool) -> None:
    d = GPU if cuda else CPU
    ap.add_argument("--tokens", nargs="+", type=positive_int, default=d["tokens"], help="T values")
    ap.add_argument("--experts", type=positive_int, default=d["experts"], help="E: experts in the layer")
    ap.add_argument("--top-k", dest="top_k", type=positive_int, default=d["top_k"], help="experts per token")
    ap.add_argument("--shapes", nargs="+", type=parse_kxn, default=d["shapes"],
                    help="HxI pairs (hidden size x expert intermediate size)")
    ap.add_argument("--ranks", nargs="+", type=positive_int, default=d["ranks"])


COLUMNS = (harness.plain_columns("T", "E", "k", "H", "I", "r", "mode") + harness.TIMING_COLUMNS
           + [("vs_experts", "x experts", "{:.3f}"), ("peak_mib", "peak MiB", "{:.0f}")] + harness.ERROR_COLUMNS)

BENCHMARK = harness.Benchmark(
    prog="fastpeft bench moe", description=__doc__, add_arguments=add_arguments, cases=cases, columns=COLUMNS,
    title="LoRA on MoE expert weights, {dtype}, ratios to the experts module without LoRA in the same run",
    plot_title="LoRA on MoE experts ({dtype})", modes=("fwd", "fwd+bwd"),
    no_gpu="No GPU here: timing PEFT's ParamWrapper and fastpeft.lora_experts (grouped_mm or the per-expert loop) "
           "against the experts module on the CPU; peak memory is measured on CUDA only.",
    baseline="experts", plot_help="bar chart of the ratios to the experts module", progress="bench moe")


def main(argv=None) -> list:
    return harness.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
