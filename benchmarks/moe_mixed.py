"""Several LoRA adapters in one batch on an MoE expert layer (PEFT's ``adapter_names``, which PEFT itself refuses on
its ``target_parameters`` layers): the accelerated layer's time with one adapter and with N mixed, as multiples of
the experts module alone, no grad (serving).

    python benchmarks/moe_mixed.py                        # T 16 and 256, 4 adapters, 64 experts top-4, 1024x512, r 16

Medians of single calls after a warm-up (``time.perf_counter``, 15 calls a provider, in turns), fp32 on the CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_moe  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", nargs="+", type=int, default=[16, 256])
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", dest="top_k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--calls", type=int, default=15)
    args = ap.parse_args(argv)
    import peft

    import fastpeft

    h, i, n_exp, k, r, n = args.hidden, args.intermediate, args.experts, args.top_k, args.rank, args.adapters
    print(f"| T | experts alone, ms | one adapter | {n} adapters mixed |\n|---|---|---|---|")
    for t in args.tokens:
        if t % n:
            raise SystemExit(f"--tokens {t} is not a multiple of --adapters {n} (one run of tokens per adapter)")
        g = torch.Generator().manual_seed(1)
        weights, index = torch.topk(torch.randn(t, n_exp, generator=g).softmax(-1), k)
        base = bench_moe.Routed(bench_moe.experts_module(h, i, n_exp, "cpu", torch.float32), index, weights)
        experts = base.experts
        cfg = dict(r=r, lora_alpha=2 * r, target_modules=[], init_lora_weights=False,
                   target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        torch.manual_seed(2)
        model = peft.get_peft_model(base, peft.LoraConfig(**cfg))
        names = ["default"] + [f"a{j}" for j in range(1, n)]
        for name in names[1:]:
            model.add_adapter(name, peft.LoraConfig(**cfg))
        fastpeft.accelerate(model, strict=True)
        model.eval()
        x = torch.randn(t, h)
        calls = {"alone": lambda: experts(x, index, weights), "one": lambda: model(x),
                 "mixed": lambda: model(x, adapter_names=names)}
        times = {name: [] for name in calls}
        with torch.no_grad():
            for fn in calls.values():
                fn()
            for _ in range(args.calls):
                for name, fn in calls.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        print(f"| {t} | {med['alone']:.2f} | {med['one'] / med['alone']:.2f}x | {med['mixed'] / med['alone']:.2f}x |")


if __name__ == "__main__":
    main()
