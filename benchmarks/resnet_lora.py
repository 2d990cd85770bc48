"""LoRA on every convolution of a ResNet (transformers ``ResNetForImageClassification``): PEFT, PEFT made fast by
``fastpeft.accelerate``, and ``fastpeft.inject``'s ``FastLoRAConv`` layers (the same adapter, loaded from PEFT's
files): one training step (forward, cross-entropy, backward) and one no-grad eval forward of the whole model.

    python benchmarks/resnet_lora.py [--depths 2 2 2 2] [--widths 64 128 256 512] [--batch 8] [--image 64]
                                     [--rank 16] [--dropout 0.0 0.1] [--dora] [--device cpu|cuda] [--rep-ms 2000]
                                     [--out FILE.md]

LoRA (or DoRA with ``--dora``) on every ``convolution`` (the 3x3 and 7x7 kernels and the 1x1 shortcuts), the head
left as it is; random weights and images (speed only). Medians (ms) of interleaved calls on the CPU
(``harness.bench_interleaved``), of ``triton.testing.do_bench`` on CUDA; speed-ups are PEFT's time over the other's.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

import fastpeft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_markdown, environment, table_head, time_model_calls  # noqa: E402

from fastpeft._cli import non_negative_int, output_file, positive_int, rate  # noqa: E402

NAMES = ("PEFT", "PEFT + accelerate", "fastpeft inject")


def models(args) -> dict:
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=args.widths[0], hidden_sizes=args.widths, depths=args.depths,
                                    layer_type="basic", num_labels=10)
    base = transformers.ResNetForImageClassification(cfg).to(args.device)
    out = {}
    for p in args.dropout:
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=p, target_modules=r".*\.convolution",
            use_dora=args.dora))
        fast = copy.deepcopy(peft_model)
        fastpeft.accelerate(fast, strict=True)
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp)
            injected = fastpeft.load_adapter(copy.deepcopy(base), tmp)
        out[p] = dict(zip(NAMES, (peft_model, fast, injected)))
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=positive_int, nargs="+", default=[2, 2, 2, 2])
    ap.add_argument("--widths", type=positive_int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--image", type=positive_int, default=64)
    ap.add_argument("--rank", type=positive_int, default=16)
    ap.add_argument("--dropout", type=rate, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rep-ms", type=non_negative_int, default=2000)
    ap.add_argument("--out", type=output_file, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if len(args.depths) != len(args.widths):
        ap.error(f"--depths and --widths give one value per stage: got {len(args.depths)} and {len(args.widths)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    torch.manual_seed(1)
    pixels = torch.randn(args.batch, 3, args.image, args.image, device=args.device)
    labels = torch.randint(0, 10, (args.batch,), device=args.device)
    rows = []
    for p, group in models(args).items():
        for what, times in time_model_calls(group, None, args.device, args.rep_ms,
                                            loss=lambda m: m(pixel_values=pixels, labels=labels).loss,
                                            forward=lambda m: m(pixel_values=pixels)).items():
            peft_ms, acc_ms, inj_ms = (times[n].median_ms for n in NAMES)
            rows.append(f"| {what} | {p} | {peft_ms:.1f} | {acc_ms:.1f} ({peft_ms / acc_ms:.2f}x) | "
                        f"{inj_ms:.1f} ({peft_ms / inj_ms:.2f}x) |")
    kind = "DoRA" if args.dora else "LoRA"
    head = table_head(f"{kind} on every convolution of a ResNet (depths {args.depths}, widths {args.widths}, batch "
                      f"{args.batch} x 3 x {args.image}², r = {args.rank})", environment(args.device))
    return emit_markdown(head, "resnet_lora.py", argv, [
        "| call | lora_dropout | PEFT ms | PEFT + accelerate ms (speed-up) | fastpeft inject ms (speed-up) |",
        "|---|---|---|---|---|", *rows], args.out)


if __name__ == "__main__":
    main()
