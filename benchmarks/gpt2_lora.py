"""LoRA on GPT-2 (transformers ``Conv1D`` projections, W stored (in, out); PEFT's ``fan_in_fan_out``): PEFT, PEFT
made fast by ``fastpeft.accelerate``, and ``fastpeft.inject``'s layers (the same adapter, loaded from PEFT's files):
one training step (forward + backward) and one no-grad eval forward of the whole model.

    python benchmarks/gpt2_lora.py [--layers 2] [--width 768] [--vocab 1000] [--batch 4] [--seq 128] [--rank 16]
                                   [--dropout 0.0 0.1] [--device cpu|cuda] [--rep-ms 2000] [--out FILE.md]

GPT-2's own dropouts are off (``*_pdrop = 0``) so that both models compute the same thing; LoRA on ``c_attn``,
``c_proj`` and ``c_fc``. Medians (ms) of interleaved calls on the CPU (``harness.bench_interleaved``), of
``triton.testing.do_bench`` on CUDA; speed-ups are PEFT's time over the other's. Before 2026-12-01 every Conv1D
layer stayed on PEFT's forward under ``accelerate``, and ``inject`` refused Conv1D targets.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch

import fastpeft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench, bench_interleaved, environment, table_head  # noqa: E402

from fastpeft._cli import non_negative_int, output_file, positive_int, rate, write_text_atomic  # noqa: E402


def models(args):
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                                  vocab_size=args.vocab, n_positions=max(args.seq, 64), resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).to(args.device)
    out = {}
    for p in args.dropout:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's "fan_in_fan_out is set to True" notice
            peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, lora_dropout=p, fan_in_fan_out=True,
                target_modules=["c_attn", "c_proj", "c_fc"]))
        fast = copy.deepcopy(peft_model)
        fastpeft.accelerate(fast, strict=True)
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp)
            injected = fastpeft.load_adapter(copy.deepcopy(base), tmp)
        out[p] = {"PEFT": peft_model, "PEFT + accelerate": fast, "fastpeft inject": injected}
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=positive_int, default=2)
    ap.add_argument("--width", type=positive_int, default=768)
    ap.add_argument("--vocab", type=positive_int, default=1000)
    ap.add_argument("--batch", type=positive_int, default=4)
    ap.add_argument("--seq", type=positive_int, default=128)
    ap.add_argument("--rank", type=positive_int, default=16)
    ap.add_argument("--dropout", type=rate, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rep-ms", type=non_negative_int, default=2000)
    ap.add_argument("--out", type=output_file, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if args.width % 64:
        ap.error(f"--width must be a multiple of 64 (GPT-2's 64-wide attention heads), got {args.width}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    rows = []
    for p, pair in models(args).items():
        def step(m):
            def fn():
                m.train()
                m.zero_grad(set_to_none=True)
                m(input_ids=ids, labels=ids).loss.backward()
            return fn

        def infer(m):
            def fn():
                m.eval()
                with torch.no_grad():
                    m(input_ids=ids)
            return fn

        for what, make in (("train step", step), ("eval forward", infer)):
            fns = {name: make(m) for name, m in pair.items()}
            if args.device == "cpu":
                times, failed = bench_interleaved(fns, rep_ms=args.rep_ms)
                if failed:
                    raise RuntimeError(f"{what}, p={p}: {failed}")
            else:
                times = {name: bench(fn, "cuda", rep_ms=args.rep_ms) for name, fn in fns.items()}
            peft_ms, acc_ms, inj_ms = (times[n].median_ms for n in ("PEFT", "PEFT + accelerate", "fastpeft inject"))
            rows.append(f"| {what} | {p} | {peft_ms:.1f} | {acc_ms:.1f} ({peft_ms / acc_ms:.2f}x) | "
                        f"{inj_ms:.1f} ({peft_ms / inj_ms:.2f}x) |")
    env = environment(args.device)
    head = table_head(f"LoRA on GPT-2 ({args.layers} blocks, width {args.width}, vocabulary {args.vocab}, batch "
                      f"{args.batch} x {args.seq} tokens, r = {args.rank}, Conv1D layers)", env)
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([head, "", f"`python benchmarks/gpt2_lora.py {cmd}`".replace(" `", "`"),
                      "", "| call | lora_dropout | PEFT ms | PEFT + accelerate ms (speed-up) "
                      "| fastpeft inject ms (speed-up) |",
                      "|---|---|---|---|---|", *rows, ""])
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
    return text


if __name__ == "__main__":
    main()
