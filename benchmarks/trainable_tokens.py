"""Trainable tokens (``LoraConfig(trainable_token_indices=...)``: new special tokens' rows trained beside LoRA) on a
LLaMA-style model with tied embeddings: PEFT, and ``fastpeft`` (the same adapter, loaded from PEFT's files): one
training step (forward + backward) and one no-grad eval forward of the whole model, and the adapter file's size
beside training the embeddings whole (``modules_to_save=["embed_tokens"]``, the usual alternative).

    python benchmarks/trainable_tokens.py [--layers 2] [--width 512] [--vocab 32000] [--tokens 16] [--batch 4]
                                          [--seq 128] [--rank 16] [--device cpu|cuda] [--rep-ms 2000] [--out FILE.md]

PEFT writes the trained rows into a copy of the whole (vocab, width) weight on every forward (``index_copy``) for
the embeddings and again for the tied head; fastpeft replaces only those tokens' outputs (a gather, and their
columns of the head). Medians (ms) of interleaved calls on the CPU (``harness.bench_interleaved``), of
``triton.testing.do_bench`` on CUDA; speed-ups are PEFT's time over fastpeft's. "Saved for backward": the
tensors one training forward keeps for backward besides the parameters (distinct storages).
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

from fastpeft._cli import positive_int  # noqa: E402


def base_model(args):
    """A LLaMA-style causal LM (--layers, --width, --vocab) with tied embeddings, random weights, seed 0."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=2 * args.width,
                                   num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                                   num_key_value_heads=args.width // 64, tie_word_embeddings=True,
                                   max_position_embeddings=max(args.seq, 64))
    return transformers.LlamaForCausalLM(cfg).to(args.device)


def file_mib(model, save) -> float:
    """The size (MiB) of adapter_model.safetensors that ``save(model, folder)`` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tmp)
        return os.path.getsize(os.path.join(tmp, "adapter_model.safetensors")) / 2**20


def saved_mib(model, ids) -> float:
    """MiB of the tensors one training forward keeps for backward, besides the model's own parameters (distinct
    storages): the activations, and PEFT's copies of the (vocab, width) weight."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values()) / 2**20


def main(argv=None) -> str:
    import peft

    ap, args = model_args(__doc__.split("\n\n")[0], argv, width=512, vocab=32000, extra=lambda ap: ap.add_argument(
        "--tokens", type=positive_int, default=16, help="how many token ids train (the vocabulary's last)"))
    if args.tokens > args.vocab:
        ap.error(f"--tokens must be at most --vocab ({args.vocab}), got {args.tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    base = base_model(args)
    new_tokens = list(range(args.vocab - args.tokens, args.vocab))
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora, trainable_token_indices=new_tokens))
        whole = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora, modules_to_save=["embed_tokens"]))
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            ours = fastpeft.load_adapter(copy.deepcopy(base), tmp)
    ids = torch.randint(0, args.vocab - args.tokens, (args.batch, args.seq), device=args.device)
    ids[:, ::8] = torch.tensor(new_tokens, device=args.device).repeat(args.seq)[:ids[:, ::8].numel()].view(
        args.batch, -1)  # every 8th token a new one
    pair = {"PEFT": theirs, "fastpeft": ours}
    rows = []

    for what, times in time_model_calls(pair, ids, args.device, args.rep_ms).items():
        peft_ms, ours_ms = times["PEFT"].median_ms, times["fastpeft"].median_ms
        ratio = peft_ms / ours_ms
        rows.append(f"| {what} (ms) | {peft_ms:.1f} | {ours_ms:.1f} ("
                    + (f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower") + ") |")
    saved = {name: saved_mib(m, ids) for name, m in pair.items()}
    rows.append(f"| saved for backward (MiB) | {saved['PEFT']:.1f} | {saved['fastpeft']:.1f} "
                f"({saved['PEFT'] - saved['fastpeft']:.1f} MiB less) |")
    sizes = (file_mib(theirs, lambda m, d: m.save_pretrained(d)), file_mib(ours, fastpeft.save_adapter),
             file_mib(whole, lambda m, d: m.save_pretrained(d)))
    env = environment(args.device)
    head = table_head(f"Trainable tokens on a LLaMA-style model ({args.layers} blocks, width {args.width}, vocabulary "
                      f"{args.vocab}, tied embeddings, {args.tokens} trained tokens, LoRA r = {args.rank} on q/v, "
                      f"batch {args.batch} x {args.seq} tokens)", env)
    return emit_markdown(head, "trainable_tokens.py", argv, [
        "| call | PEFT | fastpeft |", "|---|---|---|", *rows, "",
        f"Adapter file: {sizes[0]:.2f} MiB (PEFT), {sizes[1]:.2f} MiB (fastpeft); the same LoRA with the embeddings "
        f"trained whole (`modules_to_save=[\"embed_tokens\"]`): {sizes[2]:.1f} MiB."], args.out)


if __name__ == "__main__":
    main()
