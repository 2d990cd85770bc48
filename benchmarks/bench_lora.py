"""LoRA linear layer: frozen nn.Linear (the floor) vs fastpeft vs the eager reference vs PEFT.

    fastpeft bench                                    # the default grid for this machine
    fastpeft bench --tokens 2048 --shapes 4096x4096 --ranks 16 --dropout 0.1 --json out.json --plot out.png
    python benchmarks/bench_lora.py ...               # the same, from a checkout

Providers: ``linear`` (frozen nn.Linear), ``fastpeft`` (FastLoRALinear on the default backend: the
fused kernels on CUDA, with the fused-epilogue / cuBLAS choice measured per shape), ``fastpeft-fused``
and ``fastpeft-cublas`` (each GEMM variant forced), ``reference`` (FastLoRALinear on the PyTorch
path, i.e. eager LoRA) and ``peft`` (a PEFT LoRA layer) when installed. Modes: ``fwd`` and ``fwd+bwd``
(frozen W; dX, dA, dB computed), each with its peak memory on CUDA. Ratios are to ``linear`` of the
same shape and mode, measured in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_args, bench, environment, parse_kxn, report  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import kernels  # noqa: E402

GPU_TOKENS = [512, 2048, 8192]
GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
GPU_RANKS = [8, 16, 64]
CPU_TOKENS = [256, 1024]
CPU_SHAPES = [(512, 512), (1024, 1024)]
CPU_RANKS = [16]


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def providers(in_f, out_f, r, p, device, dtype, kernels_ok: bool):
    """name -> (module, backend or None, FASTPEFT_LORA_GEMM value or None)."""
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    layer = fastpeft.FastLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)
    out = {"linear": (lin, None, None)}
    if kernels_ok:
        out["fastpeft"] = (layer, "triton", None)
        out["fastpeft-fused"] = (layer, "triton", "fused")
        out["fastpeft-cublas"] = (layer, "triton", "cublas")
    out["reference"] = (layer, "reference", None)
    try:
        import peft
    except ImportError:
        return out
    base = nn.Sequential(nn.Linear(in_f, out_f, device=device, dtype=dtype))
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False)
    out["peft"] = (peft.get_peft_model(base, cfg), None, None)
    return out


def step_fn(mod, backend, gemm, mode, x, dy):
    """One timed call: forward, or forward + the gradients a LoRA step needs (x and the trainables)."""
    wrt = [x] + [p for p in mod.parameters() if p.requires_grad]

    def fn():
        with fastpeft.use_backend(backend or "auto"), _env("FASTPEFT_LORA_GEMM", gemm or "auto"):
            y = mod(x)
            if mode == "fwd+bwd":
                torch.autograd.grad(y, wrt, dy)
    return fn


def run(tokens, shapes, ranks, dropouts, device, dtype, modes, warmup_ms=25, rep_ms=100, progress=True):
    from tqdm.auto import tqdm

    kernels_ok = device == "cuda" and kernels.HAS_TRITON and not kernels.INTERPRET
    cases = [(m, k, n, r, p) for m in tokens for k, n in shapes for r in ranks for p in dropouts]
    rows = []
    for m, k, n, r, p in tqdm(cases, desc="bench", unit="case", disable=not progress):
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        mods = providers(k, n, r, p, device, dtype, kernels_ok)
        for mode in modes:
            times = {name: bench(step_fn(mod, be, gemm, mode, x, dy), device, warmup_ms, rep_ms)
                     for name, (mod, be, gemm) in mods.items()}
            floor = times["linear"]
            for name, t in times.items():
                row = dict(M=m, K=k, N=n, r=r, p=p, mode=mode, provider=name, ms=t.median_ms, p20=t.p20_ms,
                           p80=t.p80_ms, vs_linear=t.median_ms / floor.median_ms, peak_mib=t.peak_mib)
                if name == "fastpeft" and t.peak_mib is not None and mode == "fwd+bwd":
                    # The memory target: nn.Linear's peak + the LoRA parameters and their grads + 2 M r fp32.
                    extra = (2 * r * (k + n) * x.element_size() + 2 * m * r * 4) / 2**20
                    row["mem_budget_mib"] = floor.peak_mib + extra
                rows.append(row)
        del x, dy, mods
    return rows


def build_parser():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="fastpeft bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", nargs="+", type=int, default=GPU_TOKENS if cuda else CPU_TOKENS, help="M values")
    ap.add_argument("--shapes", nargs="+", type=parse_kxn, default=GPU_SHAPES if cuda else CPU_SHAPES,
                    help="KxN (in x out) pairs")
    ap.add_argument("--ranks", nargs="+", type=int, default=GPU_RANKS if cuda else CPU_RANKS)
    ap.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.1])
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16" if cuda else "float32")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    add_output_args(ap, "bar chart of the ratios to nn.Linear")
    return ap


COLUMNS = [("M", "M", "{}"), ("K", "K", "{}"), ("N", "N", "{}"), ("r", "r", "{}"), ("p", "p", "{}"),
           ("mode", "mode", "{}"), ("provider", "provider", "{}"), ("ms", "median ms", "{:.3f}"),
           ("p20", "p20", "{:.3f}"), ("p80", "p80", "{:.3f}"), ("vs_linear", "x nn.Linear", "{:.3f}"),
           ("peak_mib", "peak MiB", "{:.0f}"), ("mem_budget_mib", "MiB budget", "{:.0f}")]


def main(argv=None) -> list:
    args = build_parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    if device != "cuda":
        print("No GPU here: the fused kernels need one (not measured on GPU). Timing the eager reference and "
              "PEFT against nn.Linear on the CPU.\n")
    rows = run(args.tokens, args.shapes, args.ranks, args.dropout, device, getattr(torch, args.dtype), args.modes,
               args.warmup_ms, args.rep_ms, progress=not args.quiet)
    title = f"LoRA linear, {args.dtype}, ratios to frozen nn.Linear in the same run"
    return report(args, env, rows, COLUMNS, title, f"LoRA linear ({args.dtype})")


if __name__ == "__main__":
    main()
