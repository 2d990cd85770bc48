"""Many adapters in one batch (serving): each row / sequence brings its own adapter.

    fastpeft bench multi                              # the default grid for this machine
    fastpeft bench multi --decode 1 64 --prefill 8192 --adapters 1 64 --ranks mixed --json out.json

Providers (forward only, as in serving): ``single`` (FastLoRALinear with one adapter applied to all
rows: the floor), ``fastpeft`` (n adapters routed per row by ``forward(x, adapter_ids)`` on the default
backend: the grouped kernels on CUDA), ``reference`` (the same on the PyTorch loop), and ``peft`` (a
PEFT LoRA layer with n adapters and ``adapter_names``) when installed. Decode: M tokens, one per
sequence, each with a random adapter. Prefill: M tokens in sequences of 512, one adapter per sequence.
Ratios are to ``single`` of the same case, measured in the same run; ``peft / fastpeft`` is PEFT's
time over fastpeft's.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_args, bench, environment, parse_kxn, report  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import kernels  # noqa: E402

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
    return layer, single, peft_model


def run(decode, prefill, adapters, rank_sets, k, n, device, dtype, warmup_ms=25, rep_ms=100, progress=True):
    from tqdm.auto import tqdm

    kernels_ok = device == "cuda" and kernels.HAS_TRITON and not kernels.INTERPRET
    cases = [(phase, m, na, rs) for phase, ms in (("decode", decode), ("prefill", prefill)) for m in ms
             for na in adapters for rs in rank_sets]
    rows = []
    rng = random.Random(0)
    for phase, m, na, rs in tqdm(cases, desc="bench multi", unit="case", disable=not progress):
        layer, single, peft_model = build(k, n, na, RANK_SETS[rs], device, dtype)
        if phase == "decode":
            x = torch.randn(m, 1, k, device=device, dtype=dtype)
            names = [f"a{rng.randrange(na)}" for _ in range(m)]
        else:
            seqs = max(1, m // SEQ)
            x = torch.randn(seqs, m // seqs, k, device=device, dtype=dtype)
            names = [f"a{i % na}" for i in range(seqs)]
        ids = torch.tensor([int(s[1:]) for s in names], device=device)
        fns = {"single": lambda: single(x)}
        if kernels_ok:
            fns["fastpeft"] = lambda: layer(x, adapter_ids=ids)
        with torch.no_grad():
            def ref():
                with fastpeft.use_backend("reference"):
                    return layer(x, adapter_ids=ids)
            fns["reference"] = ref
            if peft_model is not None:
                fns["peft"] = lambda: peft_model(x, adapter_names=names)
            times = {name: bench(fn, device, warmup_ms, rep_ms) for name, fn in fns.items()}
        floor = times["single"].median_ms
        ours = times.get("fastpeft", times["reference"]).median_ms
        for name, t in times.items():
            rows.append(dict(phase=phase, M=m, K=k, N=n, adapters=na, ranks=rs, provider=name, ms=t.median_ms,
                             p20=t.p20_ms, p80=t.p80_ms, vs_single=t.median_ms / floor,
                             peft_over_ours=(times["peft"].median_ms / ours) if "peft" in times else None,
                             # plot_ratios reads these names
                             r=rs, p=na, mode=phase, vs_linear=t.median_ms / floor))
        del layer, single, peft_model, x
    return rows


def build_parser():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="fastpeft bench multi", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", nargs="*", type=int, default=[1, 16, 64, 256] if cuda else [1, 16, 64],
                    help="decode batch sizes (tokens)")
    ap.add_argument("--prefill", nargs="*", type=int, default=[8192] if cuda else [1024], help="prefill tokens")
    ap.add_argument("--adapters", nargs="+", type=int, default=[1, 8, 64] if cuda else [1, 8])
    ap.add_argument("--ranks", nargs="+", choices=list(RANK_SETS), default=list(RANK_SETS))
    ap.add_argument("--shape", type=parse_kxn, default=(4096, 4096) if cuda else (512, 512), help="KxN")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16" if cuda else "float32")
    add_output_args(ap, "bar chart of the ratios to one adapter")
    return ap


COLUMNS = [("phase", "phase", "{}"), ("M", "M", "{}"), ("K", "K", "{}"), ("N", "N", "{}"),
           ("adapters", "adapters", "{}"), ("ranks", "ranks", "{}"), ("provider", "provider", "{}"),
           ("ms", "median ms", "{:.3f}"), ("p20", "p20", "{:.3f}"), ("p80", "p80", "{:.3f}"),
           ("vs_single", "x single", "{:.3f}"), ("peft_over_ours", "peft/fastpeft", "{:.1f}")]


def main(argv=None) -> list:
    args = build_parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    if device != "cuda":
        print("No GPU here: the grouped kernels need one (not measured on GPU). Timing the reference loop and "
              "PEFT against a single adapter on the CPU.\n")
    k, n = args.shape
    rows = run(args.decode, args.prefill, args.adapters, args.ranks, k, n, device, getattr(torch, args.dtype),
               args.warmup_ms, args.rep_ms, progress=not args.quiet)
    title = f"Many adapters per batch, {args.dtype}, ratios to one adapter on the same rows"
    return report(args, env, rows, COLUMNS, title, f"Many adapters ({args.dtype})", baseline="single")


if __name__ == "__main__":
    main()
