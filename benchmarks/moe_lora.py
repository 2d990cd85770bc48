"""LoRA on a mixture-of-experts model's expert weights (PEFT's ``target_parameters``) and its attention projections:
PEFT, PEFT made fast by ``fastpeft.accelerate``, and ``fastpeft.inject``'s ``FastLoRAParameter`` / ``FastLoRALinear``
layers (the same adapter, loaded from PEFT's files): one training step (forward + backward) and one no-grad eval
forward of the whole model.

    python benchmarks/moe_lora.py [--layers 2] [--width 512] [--experts 32] [--top-k 4] [--intermediate 256]
                                  [--vocab 1000] [--batch 4] [--seq 128] [--rank 16] [--all-linear]
                                  [--device cpu|cuda] [--rep-ms 2000] [--out FILE.md]

A Qwen3-MoE built from its config (random weights: speed only), every layer sparse; LoRA on ``q_proj`` / ``k_proj`` /
``v_proj`` / ``o_proj`` and on ``mlp.experts.gate_up_proj`` / ``down_proj``; with ``--all-linear``
``target_modules="all-linear"`` alone, which PEFT (and ``inject``) convert for transformers 5's fused layers: the
attention projections, both expert weights (gate_up_proj at twice the rank) and each router's weight (``accelerate``
leaves the routers on PEFT's forward). Medians (ms) of interleaved calls on the
CPU (``harness.bench_interleaved``), of ``triton.testing.do_bench`` on CUDA; speed-ups are PEFT's time over the
other's.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile

import torch

import fastpeft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_markdown, environment, model_args, table_head, time_model_calls  # noqa: E402

from fastpeft._cli import positive_int  # noqa: E402

NAMES = ("PEFT", "PEFT + accelerate", "fastpeft inject")
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def models(args) -> dict:
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=args.width, intermediate_size=2 * args.width, moe_intermediate_size=args.intermediate,
        num_experts=args.experts, num_experts_per_tok=args.top_k, num_hidden_layers=args.layers,
        num_attention_heads=args.width // 64, num_key_value_heads=max(1, args.width // 128), head_dim=64,
        vocab_size=args.vocab, max_position_embeddings=max(args.seq, 64))
    base = transformers.AutoModelForCausalLM.from_config(cfg).to(args.device)
    targets = dict(target_modules="all-linear") if args.all_linear else dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=TARGET_PARAMETERS)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, init_lora_weights=False, **targets))
    fast = copy.deepcopy(peft_model)
    fastpeft.accelerate(fast, strict=not args.all_linear)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        injected = fastpeft.load_adapter(copy.deepcopy(base), tmp)
    return dict(zip(NAMES, (peft_model, fast, injected)))


def main(argv=None) -> str:
    def extra(ap):
        ap.add_argument("--experts", type=positive_int, default=32)
        ap.add_argument("--top-k", dest="top_k", type=positive_int, default=4)
        ap.add_argument("--intermediate", type=positive_int, default=256)
        ap.add_argument("--all-linear", dest="all_linear", action="store_true",
                        help='target_modules="all-linear" (PEFT converts it: experts and routers too)')
    ap, args = model_args(__doc__.split("\n\n")[0], argv, width=512, vocab=1000, extra=extra)
    if args.top_k > args.experts:
        ap.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    rows = []
    for what, times in time_model_calls(models(args), ids, args.device, args.rep_ms).items():
        peft_ms, acc_ms, inj_ms = (times[n].median_ms for n in NAMES)
        rows.append(f"| {what} | {peft_ms:.1f} | {acc_ms:.1f} ({peft_ms / acc_ms:.2f}x) | "
                    f"{inj_ms:.1f} ({peft_ms / inj_ms:.2f}x) |")
    env = environment(args.device)
    head = table_head(f"LoRA on a Qwen3-MoE ({args.layers} blocks, width {args.width}, {args.experts} experts top-"
                      f"{args.top_k} of width {args.intermediate}, vocabulary {args.vocab}, batch {args.batch} x "
                      f"{args.seq} tokens, r = {args.rank} on " + ("all-linear, converted by PEFT: the attention "
                      "projections, the expert weights and the routers)" if args.all_linear else
                      "the attention projections and the expert weights)"), env)
    return emit_markdown(head, "moe_lora.py", argv, [
        "| call | PEFT ms | PEFT + accelerate ms (speed-up) | fastpeft inject ms (speed-up) |",
        "|---|---|---|---|", *rows], args.out)


if __name__ == "__main__":
    main()
