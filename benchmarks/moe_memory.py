"""Peak host memory of one training step of an MoE expert layer on the CPU: the experts module alone, PEFT's
``ParamWrapper`` (LoRA on both expert weights: it forms W + s B A for every expert, and backward its gradient) and
the same model after ``fastpeft.accelerate`` (``fastpeft.lora_experts``: no (E, out, in) temporary).

    python benchmarks/moe_memory.py                       # T 16 and 2048, 64 experts, top-4, H 1024, I 512, r 16

``torch.cuda.max_memory_allocated`` has no CPU counterpart: each provider runs in a fresh process, and the table
gives how far one forward + backward raises the process's peak resident set (``ru_maxrss``) above what building the
model left it at. (``fastpeft bench moe`` measures the peak on CUDA directly.)
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("experts", "peft", "fastpeft")


def one(which: str, t: int, h: int, i: int, n_exp: int, k: int, r: int) -> int:
    """KiB the peak resident set grows by in one forward + backward of ``which`` (this process)."""
    import torch

    sys.path.insert(0, HERE)
    import bench_moe

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(1)
    weights, index = torch.topk(torch.randn(t, n_exp, generator=g).softmax(-1), k)
    mod = bench_moe.Routed(bench_moe.experts_module(h, i, n_exp, "cpu", torch.float32), index, weights)
    if which != "experts":
        import peft

        import fastpeft

        mod = peft.get_peft_model(mod, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                       init_lora_weights=False,
                                                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
        if which == "fastpeft":
            fastpeft.accelerate(mod, strict=True)
    x = torch.randn(t, h, requires_grad=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    y = mod(x)
    y.backward(torch.ones_like(y))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", nargs="+", type=int, default=[16, 2048])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", dest="top_k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--one", nargs=2, metavar=("PROVIDER", "T"), help=argparse.SUPPRESS)  # (the child process)
    args = ap.parse_args(argv)
    dims = (args.hidden, args.intermediate, args.experts, args.top_k, args.rank)
    if args.one:
        print(one(args.one[0], int(args.one[1]), *dims))
        return
    weights_mib = 3 * args.experts * args.hidden * args.intermediate * 4 / 2 ** 20
    print(f"Peak RSS growth of one forward + backward, MiB (fp32 expert weights {weights_mib:.0f} MiB; E "
          f"{args.experts}, top-{args.top_k}, H {args.hidden}, I {args.intermediate}, r {args.rank}, 2 threads)\n")
    print("| T | " + " | ".join(PROVIDERS) + " |\n|---|" + "---|" * len(PROVIDERS))
    for t in args.tokens:
        cells = []
        for which in PROVIDERS:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", which, str(t),
                                  "--experts", str(args.experts), "--top-k", str(args.top_k), "--hidden",
                                  str(args.hidden), "--intermediate", str(args.intermediate), "--rank",
                                  str(args.rank)], capture_output=True, text=True, check=True)
            cells.append(f"{int(out.stdout.split()[-1]) / 1024:.0f}")
        print(f"| {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
