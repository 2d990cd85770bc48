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

import copy
import os
import sys
import tempfile
import warnings

import torch

import fastpeft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_markdown, environment, model_args, table_head, time_model_calls  # noqa: E402

from fastpeft._cli import rate  # noqa: E402


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
    _, args = model_args(__doc__.split("\n\n")[0], argv, width=768, vocab=1000, extra=lambda ap: ap.add_argument(
        "--dropout", type=rate, nargs="+", default=[0.0, 0.1]))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    rows = []
    for p, pair in models(args).items():
        for what, times in time_model_calls(pair, ids, args.device, args.rep_ms).items():
            peft_ms, acc_ms, inj_ms = (times[n].median_ms for n in ("PEFT", "PEFT + accelerate", "fastpeft inject"))
            rows.append(f"| {what} | {p} | {peft_ms:.1f} | {acc_ms:.1f} ({peft_ms / acc_ms:.2f}x) | "
                        f"{inj_ms:.1f} ({peft_ms / inj_ms:.2f}x) |")
    env = environment(args.device)
    head = table_head(f"LoRA on GPT-2 ({args.layers} blocks, width {args.width}, vocabulary {args.vocab}, batch "
                      f"{args.batch} x {args.seq} tokens, r = {args.rank}, Conv1D layers)", env)
    return emit_markdown(head, "gpt2_lora.py", argv, [
        "| call | lora_dropout | PEFT ms | PEFT + accelerate ms (speed-up) | fastpeft inject ms (speed-up) |",
        "|---|---|---|---|---|", *rows], args.out)


if __name__ == "__main__":
    main()
