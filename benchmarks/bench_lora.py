"""LoRA linear layer: frozen nn.Linear (the floor) vs fastpeft vs PEFT, forward and forward+backward.

    python benchmarks/bench_lora.py                 # CPU-sized defaults, or LLM shapes on CUDA
    python benchmarks/bench_lora.py --json out.json --shapes 2048x4096x4096 --ranks 16 --dropout 0.1

Providers: ``linear`` (frozen nn.Linear), ``fastpeft`` (FastLoRALinear, default backend), ``reference``
(FastLoRALinear forced onto the PyTorch path) and ``peft`` (a PEFT LoRA layer) when installed.
Ratios are against ``linear`` from the same run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench, environment, print_table, write_json  # noqa: E402

import fastpeft  # noqa: E402


def providers(in_f, out_f, r, p, device, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    layer = fastpeft.FastLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)
    out = {"linear": (lin, None), "fastpeft": (layer, None), "reference": (layer, "reference")}
    try:
        import peft
    except ImportError:
        return out
    base = nn.Sequential(nn.Linear(in_f, out_f, device=device, dtype=dtype))
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False)
    out["peft"] = (peft.get_peft_model(base, cfg), None)
    return out


def run(shapes, ranks, dropouts, device, dtype, modes):
    rows = []
    for m, k, n in shapes:
        for r in ranks:
            for p in dropouts:
                x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
                dy = torch.randn(m, n, device=device, dtype=dtype)
                times = {}
                for name, (mod, backend) in providers(k, n, r, p, device, dtype).items():
                    mod.train()
                    for mode in modes:
                        def fn(mod=mod, backend=backend, mode=mode):
                            with fastpeft.use_backend(backend or "auto"):
                                y = mod(x)
                                if mode == "fwd+bwd":
                                    y.backward(dy)
                        t = bench(fn, device)
                        times[(name, mode)] = t
                for mode in modes:
                    floor = times[("linear", mode)].median_ms
                    for (name, md), t in times.items():
                        if md == mode:
                            rows.append(dict(M=m, K=k, N=n, r=r, p=p, mode=mode, provider=name, ms=t.median_ms,
                                             p20=t.p20_ms, p80=t.p80_ms, peak_mib=t.peak_mib,
                                             vs_linear=t.median_ms / floor))
    return rows


def _shape(s):
    return tuple(int(v) for v in s.split("x"))


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=_shape,
                    default=[(2048, 4096, 4096), (8192, 4096, 4096)] if cuda else [(256, 512, 512), (1024, 1024, 1024)],
                    help="MxKxN token x in x out")
    ap.add_argument("--ranks", nargs="+", type=int, default=[16])
    ap.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.1])
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    env = environment(device)
    rows = run(args.shapes, args.ranks, args.dropout, device, getattr(torch, args.dtype), args.modes)
    cols = [("M", "M", "{}"), ("K", "K", "{}"), ("N", "N", "{}"), ("r", "r", "{}"), ("p", "p", "{}"),
            ("mode", "mode", "{}"), ("provider", "provider", "{}"), ("ms", "median ms", "{:.3f}"),
            ("vs_linear", "x nn.Linear", "{:.2f}"), ("peak_mib", "peak MiB", "{:.0f}")]
    print_table(f"LoRA linear, {args.dtype}", env, rows, cols)
    if args.json:
        write_json(args.json, env, rows)
    return rows


if __name__ == "__main__":
    main()
