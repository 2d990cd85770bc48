"""Pick each demo method's learning rate on a validation split carved from the training reviews.

    python benchmarks/demo_lr_sweep.py --methods sparse lora+sparse --scales 0.33 1 3 --json sweep.json

The test reviews are never looked at: the last ``--val`` reviews of the demo's fixed shuffle of the
training split are held out, the rest train for ``--steps`` steps (the demo's default run), and each
(method, lr) gets validation accuracy / macro-F1 over ``--seeds`` seeds. The learning rates in
``fastpeft.demo.classify.METHODS`` are the ones this picked (see the README's demo section).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from types import SimpleNamespace

import torch


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from fastpeft.demo import classify
    from fastpeft.demo.data import find_data_zip, read_reviews, subset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", required=True, choices=list(classify.METHODS))
    p.add_argument("--lrs", nargs="+", type=float, help="learning rates to try for every method")
    p.add_argument("--scales", nargs="+", type=float, default=[1 / 3, 1.0, 3.0],
                   help="without --lrs: multiples of each method's current learning rate (default 1/3 1 3)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--val", type=int, default=120, help="training reviews held out for validation")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--json", help="write every (method, lr, seed) result")
    args = p.parse_args(argv)

    splits = read_reviews(find_data_zip())
    rows = subset(splits["train"], None)
    fit_rows, val_rows = rows[:-args.val], rows[-args.val:]
    tokenizer, encoder = classify.load_encoder(classify.find_model_dir())
    fit, val = classify.encode(tokenizer, fit_rows, args.seq_len), classify.encode(tokenizer, val_rows, args.seq_len)
    run_args = SimpleNamespace(steps=args.steps, batch_size=16)
    majority = max(float(val[2].float().mean()), 1 - float(val[2].float().mean()))
    print(f"{len(fit_rows)} train / {len(val_rows)} validation reviews (validation majority {100 * majority:.1f}%), "
          f"{args.steps} steps")
    results = []
    bar = tqdm(total=len(args.methods) * len(args.lrs or args.scales) * args.seeds * args.steps, unit="step")
    start = time.perf_counter()
    for name in args.methods:
        base = classify.METHODS[name].lr
        lrs = [0.0] if name == "head" else args.lrs or [float(f"{base * k:.2g}") for k in args.scales]
        for lr in lrs:
            method = dataclasses.replace(classify.METHODS[name], lr=lr)
            for seed in range(args.seeds):
                bar.set_description(f"{name} lr {lr:g} seed {seed}")
                r = classify.run_one(method, encoder, fit, val, run_args, seed, "cpu", bar)
                r.pop("losses")
                results.append({"method": name, "lr": lr, **r})
    bar.close()
    print(f"\n{'method':<12} {'lr':>8} {'val acc %':>10} {'val F1 %':>9} {'pos rate':>8}")
    for name in args.methods:
        for lr in sorted({r["lr"] for r in results if r["method"] == name}):
            rs = [r for r in results if r["method"] == name and r["lr"] == lr]
            acc = sum(r["accuracy"] for r in rs) / len(rs)
            f1 = sum(r["macro_f1"] for r in rs) / len(rs)
            pos = sum(r["positive_rate"] for r in rs) / len(rs)
            print(f"{name:<12} {lr:>8g} {100 * acc:>10.1f} {100 * f1:>9.1f} {pos:>8.2f}")
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"validation_majority": majority, "steps": args.steps, "val": args.val,
                       "torch": torch.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
