"""``fastpeft demo``: fine-tune a real pretrained model on real data, offline, and show what each PEFT
method trains and reaches.

    fastpeft demo                                    # the MiniLM method table, ~3 min on 2 cores
    fastpeft demo --full --seeds 3 --json d.json --plot d.png
    fastpeft demo --model smollm2                    # LoRA on SmolLM2-135M as a causal LM
    fastpeft demo --4bit                             # LoRA over the fp32 and an NF4 (bitsandbytes) encoder
    fastpeft demo --model smollm2 --4bit             # the same for SmolLM2's decoder layers

``data.py``: the Drugs.com reviews, the installed packages holding data and weights, peak memory;
``classify.py``: the MiniLM run (one row per method); ``lm.py``: the SmolLM2 run. Both runs import
``data`` and nothing else of the demo; this module parses the options and picks the run.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .._cli import output_file, positive_float, positive_int, rate
from . import classify, lm
from .data import MissingPackage


def device(s):
    """An argparse ``type``: a torch device this machine has (checked before any data or weights load)."""
    try:
        d = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {s!r} (cpu, cuda, cuda:1, ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s!r}: this torch has no CUDA device (torch {torch.__version__})")
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{s!r}: the demo runs on 'cpu' or 'cuda'")
    return s


def build_parser() -> argparse.ArgumentParser:
    methods, default = classify.METHODS, classify.DEFAULT_METHODS
    p = argparse.ArgumentParser(prog="fastpeft demo", description=(
        "Fine-tune all-MiniLM-L6-v2 on Drugs.com review sentiment, offline, with each PEFT method, and "
        "print trainable parameters, test accuracy / macro-F1, seconds per step and peak memory."))
    p.add_argument("--methods", nargs="+", choices=list(methods), metavar="METHOD",
                   help=f"methods to run, of {', '.join(methods)} (default: {' '.join(default)}; --full: all)")
    p.add_argument("--full", action="store_true",
                   help="all methods (but qlora, loftq, eva, corda, pissa, olora) and all the test reviews")
    p.add_argument("--4bit", dest="four_bit", action="store_true",
                   help="the lora row and the same LoRA over an NF4 base (qlora: bitsandbytes Linear4bit, double "
                        "quant, for every encoder linear layer), side by side; with --model smollm2, LoRA over the "
                        "fp32 model and over its decoder layers in NF4")
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds per method (mean ± std when > 1)")
    p.add_argument("--steps", type=positive_int, help="training steps per run (default 100; smollm2: 40)")
    p.add_argument("--max-train", type=positive_int, help="training examples (default: all; smollm2: 320)")
    p.add_argument("--max-test", type=positive_int, help="test examples (default 200, --full all; smollm2: 64)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, help="tokens per review (default 64)")
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                   help="minilm: the method table (default); smollm2: LoRA on SmolLM2-135M-Instruct as a causal "
                        "LM (held-out loss / perplexity before and after, and a generated sample)")
    p.add_argument("--lm-lr", type=positive_float, default=1e-3, help="smollm2: LoRA learning rate (default 1e-3)")
    p.add_argument("--lm-batch-size", type=positive_int, default=8, help="smollm2: batch size (default 8)")
    p.add_argument("--lm-dropout", type=rate, default=0.0,
                   help="smollm2: LoRA dropout (default 0, as the README's figures)")
    p.add_argument("--lm-new-tokens", type=positive_int, default=40,
                   help="smollm2: tokens of the generated sample (default 40)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="FILE", type=output_file, help="write the rows and the environment as JSON")
    p.add_argument("--plot", metavar="PNG", type=output_file, help="loss curves and accuracy vs trainable parameters")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> dict:
    """The run ``args.model`` names, with the parsed options; returns what it printed, as a dict."""
    return lm.run(args) if args.model == "smollm2" else classify.run(args)


def main(argv=None) -> int:
    """``fastpeft demo ARGS``: 0 when the run finished, 2 (with the pip command) when a package is missing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model == "smollm2" and (args.methods or args.full or args.seeds > 1):
        parser.error("--methods, --full and --seeds belong to the minilm table; --model smollm2 runs LoRA only")
    if args.four_bit and args.methods:
        parser.error("--4bit runs the minilm methods lora and qlora; use --methods ... qlora for others")
    try:
        run(args)
    except MissingPackage as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


__all__ = ["build_parser", "main", "run"]
