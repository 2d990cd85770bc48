"""PiSSA / OLoRA (PEFT's ``init_lora_weights="pissa_niter_<n>"`` / ``"olora"``) on a whole Llama-style model: PEFT's
``get_peft_model`` against ``fastpeft.inject`` on the same config, under the same seed (the same factors and residual
weights, bit for bit, checked here): the time to make the adapter (the SVD / QR of every target weight), one training
step (forward + backward) and one no-grad eval forward.

    python benchmarks/pissa_lora.py [--init pissa_niter_4] [--layers 2] [--width 576] [--vocab 1000] [--batch 4]
                                    [--seq 128] [--rank 16] [--device cpu|cuda] [--rep-ms 2000] [--out FILE.md]

A LlamaForCausalLM built from its config (random weights: speed only; width 576 and 9 heads of 64 as SmolLM2-135M,
MLP width 1536), LoRA on ``"all-linear"``. Making the adapter: the median of 5 interleaved rounds per library (each on
its own copy of the base model); calls are medians (ms) of interleaved calls on the CPU
(``harness.bench_interleaved``), of ``triton.testing.do_bench`` on CUDA; speed-ups are PEFT's time over fastpeft's.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
import warnings

import torch

import fastpeft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit_markdown, environment, model_args, table_head, time_model_calls  # noqa: E402

NAMES = ("PEFT", "fastpeft inject")
ROUNDS = 5  # of making the adapter, interleaved


def models(args) -> tuple:
    """``({name: model}, {name: seconds to make the adapter})``; the two models' weights checked equal."""
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=args.width, intermediate_size=8 * args.width // 3,
                                   num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                                   num_key_value_heads=max(1, args.width // 192), head_dim=64, vocab_size=args.vocab,
                                   max_position_embeddings=max(args.seq, 64))
    base = transformers.LlamaForCausalLM(cfg).to(args.device)
    config = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=args.init)
    made, seconds = {}, {n: [] for n in NAMES}
    for _ in range(ROUNDS):  # interleaved rounds, the median of each library's (the first warms up imports)
        for name, make in zip(NAMES, (peft.get_peft_model, fastpeft.inject)):
            model = copy.deepcopy(base)
            torch.manual_seed(1)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                made[name] = make(model, peft.LoraConfig(**config))
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    theirs = {k.replace("base_model.model.", "").replace("base_layer.", "").replace(".default.weight", ""): v
              for k, v in made["PEFT"].state_dict().items()}
    compared = 0
    for k, v in made["fastpeft inject"].state_dict().items():
        k = k.replace("_adapters.default", "")  # fastpeft's lora_A_adapters.default: PEFT's lora_A.default.weight
        if k in theirs:
            if not torch.equal(v, theirs[k]):
                raise RuntimeError(f"{k} differs between PEFT's and fastpeft's {args.init} init")
            compared += ".lora_" in k
    if compared != 2 * sum(1 for m in made["PEFT"].modules() if isinstance(m, peft.tuners.lora.LoraLayer)):
        raise RuntimeError(f"compared {compared} LoRA factors of PEFT's and fastpeft's models, not all of them")
    return made, {n: statistics.median(t) for n, t in seconds.items()}


def main(argv=None) -> str:
    def extra(ap):
        ap.add_argument("--init", default="pissa_niter_4",
                        help="PEFT's init_lora_weights: pissa, pissa_niter_<n> or olora (default pissa_niter_4)")
    ap, args = model_args(__doc__.split("\n\n")[0], argv, width=576, vocab=1000, extra=extra)
    from fastpeft._checks import base_rewriting_init
    if base_rewriting_init(args.init) is None:
        ap.error(f"--init must be pissa, pissa_niter_<n> or olora, got {args.init!r}")
    made, seconds = models(args)
    rows = [f"| make the adapter (s) | {seconds['PEFT']:.2f} | {seconds['fastpeft inject']:.2f} "
            f"({seconds['PEFT'] / seconds['fastpeft inject']:.2f}x) |"]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    for what, times in time_model_calls(made, ids, args.device, args.rep_ms).items():
        peft_ms, inj_ms = (times[n].median_ms for n in NAMES)
        rows.append(f"| {what} (ms) | {peft_ms:.1f} | {inj_ms:.1f} ({peft_ms / inj_ms:.2f}x) |")
    head = table_head(f"LoRA r = {args.rank} on all-linear, init_lora_weights={args.init!r}, a Llama ({args.layers} "
                      f"blocks, width {args.width}, vocabulary {args.vocab}), batch {args.batch} x {args.seq} tokens",
                      environment(args.device))
    return emit_markdown(head, "pissa_lora.py", argv, [
        "| what | PEFT | fastpeft inject (speed-up) |", "|---|---|---|", *rows], args.out)


if __name__ == "__main__":
    main()
