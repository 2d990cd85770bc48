"""``fastpeft`` (also ``python -m fastpeft``): the command line.

``fastpeft`` / ``fastpeft train``: inject LoRA into a small built-in transformer, train it for a few
seconds on the CPU to match a "fine-tuned" teacher, and show the trainable-parameter summary and the
falling loss. It runs everywhere torch runs, offline, and ends with a save / load round trip.

``fastpeft bench [lora]``: the LoRA microbenchmark table (``benchmarks/bench_lora.py``);
``fastpeft bench multi``: many adapters per batch (``benchmarks/bench_multi.py``);
``fastpeft bench sparse``: sparse deltas (``benchmarks/bench_sparse.py``); ``fastpeft bench qlora``: LoRA on a
4-bit or 8-bit bitsandbytes base (``benchmarks/bench_qlora.py``); ``fastpeft bench dora``: DoRA vs LoRA and PEFT's
DoRA (``benchmarks/bench_dora.py``); ``fastpeft bench moe``: LoRA on a mixture of experts' expert weights
(``benchmarks/bench_moe.py``); ``fastpeft bench conv``: LoRA on convolutions (``benchmarks/bench_conv.py``);
``--help`` on each. ``fastpeft bench plot RESULT.json``: the bar chart of a table already measured (``--json``),
e.g. a device run's.

``fastpeft demo``: fine-tune all-MiniLM-L6-v2 on Drugs.com reviews with each PEFT method, or LoRA on
SmolLM2 (the ``fastpeft/demo/`` package); ``fastpeft demo --help``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._cli import output_file, positive_float, positive_int, rate, write_text_atomic


class TinyBlock(nn.Module):
    """Pre-norm transformer block with LLaMA's module names (q/k/v/o_proj, up/down_proj)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.up_proj, self.down_proj = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, h):
        b, t, d = h.shape
        x = self.norm1(h)
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = h + self.o_proj(a)
        return h + self.down_proj(F.gelu(self.up_proj(self.norm2(h))))


class TinyTransformer(nn.Module):
    """A small causal transformer: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 2, heads: int = 4, hidden: int = 512):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        for blk in self.blocks:
            h = blk(h)
        return self.lm_head(self.norm(h))


def _teacher(student: nn.Module, rank: int, targets, gen: torch.Generator) -> nn.Module:
    """A copy of ``student`` whose target weights moved by a random rank-``rank`` update: the
    "fine-tuned" model that LoRA of rank >= ``rank`` can match exactly."""
    import copy

    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for name, m in teacher.named_modules():
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                out_f, in_f = m.weight.shape
                u = torch.randn(out_f, rank, generator=gen) / math.sqrt(rank)
                v = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
                m.weight += 0.5 * (u @ v)
    return teacher.eval()


def train(args) -> dict:
    """The toy fine-tuning job behind ``fastpeft train``; returns its summary as a dict."""
    from tqdm.auto import tqdm

    import fastpeft

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    model = TinyTransformer()
    teacher = _teacher(model, rank=4, targets=targets, gen=gen)
    config = fastpeft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                                 target_modules=targets)
    fastpeft.inject(model, config)
    summary = fastpeft.format_trainable_parameters(model)
    n_lora = len(fastpeft.lora_layers(model))
    print(f"fastpeft {fastpeft.__version__}: LoRA r={args.rank} on {n_lora} layers of a "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter transformer, "
          f"backend={fastpeft.current_backend(args.backend)}")
    print(summary)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    eval_ids = torch.randint(0, 256, (16, args.seq), generator=gen)
    with torch.no_grad():
        eval_target = teacher(eval_ids)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = F.mse_loss(model(eval_ids), eval_target).item()
        model.train()
        return loss

    history = [(0, eval_loss())]
    start = time.perf_counter()
    model.train()
    steps = 0
    bar = tqdm(range(args.steps), desc="training", unit="step", disable=args.quiet, dynamic_ncols=True)
    with fastpeft.use_backend(args.backend):
        for step in bar:
            ids = torch.randint(0, 256, (args.batch, args.seq), generator=gen)
            with torch.no_grad():
                target = teacher(ids)
            loss = F.mse_loss(model(ids), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps = step + 1
            if steps % args.log_every == 0 or steps == args.steps:
                history.append((steps, eval_loss()))
                bar.set_postfix(eval_loss=f"{history[-1][1]:.4g}")
            if time.perf_counter() - start > args.max_seconds:
                history.append((steps, eval_loss()))
                break
    bar.close()
    elapsed = time.perf_counter() - start

    print("\n  step   held-out loss")
    for s, l in history:
        print(f"{s:6d}   {l:.5f}")
    first, last = history[0][1], history[-1][1]
    print(f"\nloss {first:.5f} -> {last:.5f} ({first / max(last, 1e-12):.1f}x lower) in {steps} steps, "
          f"{elapsed:.1f} s ({steps / elapsed:.1f} steps/s)")

    result = {"summary": summary, "steps": steps, "seconds": elapsed, "history": history,
              "trainable": fastpeft.trainable_parameters(model)[0], "total": fastpeft.trainable_parameters(model)[1]}
    # Round trip through PEFT's file format: the reloaded adapter must give the same outputs.
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.save or os.path.join(tmp, "adapter")
        fastpeft.save_adapter(model, out_dir)
        fresh = TinyTransformer()
        fresh.load_state_dict(_base_state(model))
        fastpeft.load_adapter(fresh, out_dir)
        model.eval()
        fresh.eval()
        with torch.no_grad():
            same = torch.allclose(model(eval_ids), fresh(eval_ids), rtol=1e-5, atol=1e-6)
        print(f"adapter saved to {out_dir if args.save else 'a temporary folder'} (PEFT format) and "
              f"reloaded into a fresh model: outputs {'match' if same else 'DIFFER'}")
        result["reload_matches"] = same
    return result


def _base_state(model: nn.Module) -> dict:
    """The base model's weights under their original names (LoRA layers keep weight / bias)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" not in k}


BENCHES = {"lora": "bench_lora", "multi": "bench_multi", "sparse": "bench_sparse", "qlora": "bench_qlora",
           "dora": "bench_dora", "moe": "bench_moe", "conv": "bench_conv"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpeft", description="Parameter-efficient fine-tuning with fused kernels.")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("bench", help="microbenchmark tables: 'fastpeft bench [lora]' (one adapter vs nn.Linear, "
                   "the reference and PEFT), 'fastpeft bench multi' (many adapters per batch), "
                   "'fastpeft bench sparse' (sparse deltas), 'fastpeft bench qlora' (LoRA on a 4/8-bit base), "
                   "'fastpeft bench dora' (DoRA), 'fastpeft bench moe' (LoRA on MoE expert weights), 'fastpeft bench "
                   "conv' (LoRA on convolutions); 'fastpeft bench plot RESULT.json' charts a --json table",
                   add_help=False)
    sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 on Drugs.com reviews with each PEFT method, offline; "
                   "'fastpeft demo --help'", add_help=False)
    t = sub.add_parser("train", help="LoRA on a small built-in transformer, a few seconds on CPU (default)")
    t.add_argument("--steps", type=positive_int, default=500, help="at most this many steps (default 500)")
    t.add_argument("--max-seconds", type=positive_float, default=20.0, help="stop after this long (default 20)")
    t.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    t.add_argument("--dropout", type=rate, default=0.0, help="LoRA dropout (default 0)")
    t.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    t.add_argument("--batch", type=positive_int, default=8)
    t.add_argument("--seq", type=positive_int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=positive_int, default=25)
    t.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    t.add_argument("--save", metavar="DIR", help="also keep the trained adapter in DIR")
    t.add_argument("--json", metavar="FILE", type=output_file, help="write the summary as JSON to FILE")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _bench_module(name: str = "bench_lora"):
    """A benchmark script (``bench_lora``, ``bench_multi``) from the benchmarks folder: installed as
    fastpeft/benchmarks by ``pip install .``, or beside the package in a checkout (editable installs)."""
    import importlib
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for folder in (here / "benchmarks", here.parent / "benchmarks"):
        if (folder / "bench_lora.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return importlib.import_module(name)
    raise SystemExit("fastpeft bench: the benchmarks folder is missing from this install; reinstall fastpeft "
                     "(pip install .) or run it from a checkout")


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train"] + argv
    if argv and argv[0] == "bench":
        if len(argv) > 1 and argv[1] == "plot":  # charts of tables already measured (a device run's JSON)
            _bench_module("harness").plot_main(argv[2:])
            return 0
        if len(argv) > 1 and not argv[1].startswith("-") and argv[1] not in BENCHES:
            parser.error(f"unknown bench {argv[1]!r}: one of {', '.join(BENCHES)} or plot (fastpeft bench --help)")
        which = argv[1] if len(argv) > 1 and argv[1] in BENCHES else "lora"
        rest = argv[2:] if len(argv) > 1 and argv[1] in BENCHES else argv[1:]
        _bench_module(BENCHES[which]).main(rest)
        return 0
    if argv and argv[0] == "demo":
        from . import demo

        return demo.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "train":
        result = train(args)
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=2))
        return 0 if result["reload_matches"] else 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
