"""Bytes / flops model of every LoRA kernel and of nn.Linear, and the time the roofline allows on an
H100 / H200: what a device run (benchmarks/device_check.sh, profile_lora.py) is read against.

Each kernel reads its inputs and writes its outputs once (perfect reuse through shared memory and L2: a
lower bound on traffic) and its time is ``max(flops / peak flop/s, bytes / peak bandwidth)``: a lower
bound, never a prediction of what a real kernel reaches (cuBLAS gets ~70-80% of dense peak on large
GEMMs). Offline numbers, computed, not measured.

    python benchmarks/roofline.py                   # the target shapes, table + benchmarks/results/roofline-<date>.md
    python benchmarks/roofline.py --tokens 4096 --shapes 4096x4096 --ranks 8 64 --no-write
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

# Dense bf16 tensor-core peak and HBM bandwidth (NVIDIA datasheets, SXM parts).
CARDS = {
    "H100-SXM": {"flops": 989e12, "bandwidth": 3.35e12},
    "H200": {"flops": 989e12, "bandwidth": 4.8e12},
}
TARGET_SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16),
                 (1, 4096, 4096, 16), (16, 4096, 4096, 16), (64, 4096, 4096, 16)]


@dataclass(frozen=True)
class Cost:
    """One kernel: what it computes, its floating-point operations and the bytes it must move."""
    name: str
    what: str
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")

    def seconds(self, card: str) -> float:
        c = CARDS[card]
        return max(self.flops / c["flops"], self.bytes / c["bandwidth"])

    def bound(self, card: str) -> str:
        c = CARDS[card]
        return "compute" if self.flops / c["flops"] >= self.bytes / c["bandwidth"] else "memory"


def gemm(name: str, what: str, m: int, k: int, n: int, itemsize: int = 2, out_itemsize: int | None = None) -> Cost:
    """(m, k) @ (k, n): 2 m k n flops; reads both operands and writes the (m, n) result once."""
    out_itemsize = itemsize if out_itemsize is None else out_itemsize
    return Cost(name, what, 2.0 * m * k * n, (m * k + k * n) * itemsize + m * n * out_itemsize)


def linear_costs(M: int, K: int, N: int, itemsize: int = 2) -> dict:
    """Frozen nn.Linear (M, K) -> (M, N) with bias: its forward and its backward for dX only."""
    fwd = gemm("linear fwd", "y = x W^T + b", M, K, N, itemsize)
    fwd = Cost(fwd.name, fwd.what, fwd.flops, fwd.bytes + N * itemsize)
    dx = gemm("linear dX", "dX = dY W", M, N, K, itemsize)
    return {"fwd": [fwd], "bwd": [dx]}


SMS = 132  # streaming multiprocessors of the H100 SXM and the H200: the dY pass's split rule reads it


def dy_pass_layout(M: int, N: int, r: int, sms: int = SMS) -> tuple:
    """``(block_m, row_blocks, column_chunks)`` of ``_lora_dy_pass_kernel`` as its launcher cuts dY on a GPU
    (kernels/lora.py ``dy_pass_block_m``, ``dy_pass_split``, ``split_chunk``; tests/test_roofline.py checks
    the two agree): row blocks of min(256, 8192 / R_PAD) rows, one program per SM, column chunks of at
    least 4 x 128 columns, multiples of 128."""
    rp = max(16, 1 << (max(r, 1) - 1).bit_length())
    block_m = max(16, min(256, 8192 // rp, 1 << (max(M, 1) - 1).bit_length()))
    rows = -(-M // block_m)
    split = max(1, min(-(-sms // rows), -(-N // 512), 64))
    per = -(-(-(-N // split)) // 128) * 128
    return block_m, rows, -(-N // per)


def lora_costs(M: int, K: int, N: int, r: int, itemsize: int = 2, fused_dy_pass: bool = False) -> dict:
    """The kernels of one LoRA layer's forward and backward (frozen W, dX needed), as LoRALinearFunction
    launches them: u = drop(x) A^T and v = dY B in fp32 (4 bytes), everything else in the input dtype.

    ``fused_dy_pass``: the backward's "kernels-dy1" composition (issue 12 item 2): v = dY B and dB = s dY^T u
    from one read of dY (``_lora_dy_pass_kernel``), which writes fp32 partials (v per column chunk, dB per
    row block, ``dy_pass_layout``) that a second step adds: the pass row counts their writes, the
    "dY pass sums" row their reads and the sums' writes (none for a partial count of 1: a view).
    """
    e, f = itemsize, 4
    fwd = [
        Cost("shrink", "u = drop(x) A^T", 2.0 * M * K * r, (M * K + r * K) * e + M * r * f),
        Cost("fused GEMM", "y = x W^T + s u B^T + b", 2.0 * M * K * N + 2.0 * M * r * N,
             (M * K + N * K + N * r + N) * e + M * r * f + M * N * e),
    ]
    if fused_dy_pass:
        _, rows, split = dy_pass_layout(M, N, r)
        parts = (split * M * r + rows * N * r) * f
        summed = ((split * M * r * f + M * r * f) if split > 1 else 0) + ((rows * N * r * f + N * r * f)
                                                                          if rows > 1 else 0)
        dy = [Cost("dY pass", f"v = dY B, dB = s dY^T u (one read of dY; {split}x{rows} partials)", 4.0 * M * N * r,
                   (M * N + N * r) * e + M * r * f + parts),
              Cost("dY pass sums", "v, dB partials added in a fixed order",
                   float((split - 1) * M * r + (rows - 1) * N * r), summed)]
    else:
        dy = [Cost("dY B", "v = dY B", 2.0 * M * N * r, (M * N + N * r) * e + M * r * f),
              Cost("dB", "dB = s dY^T u", 2.0 * M * N * r, M * N * e + M * r * f + N * r * e)]
    bwd = dy + [
        Cost("dA", "dA = s v^T drop(x)", 2.0 * M * K * r, M * K * e + M * r * f + r * K * e),
        Cost("dX fused", "dX = dY W + s mask (v A)/(1-p)", 2.0 * M * N * K + 2.0 * M * r * K,
             (M * N + N * K + r * K) * e + M * r * f + M * K * e),
    ]
    return {"fwd": fwd, "bwd": bwd}


def lowrank_add_cost(M: int, N: int, r: int, itemsize: int = 2) -> Cost:
    """The cuBLAS path's in-place update out += s mask (lu @ lv): one read and one write of out."""
    return Cost("low-rank add", "out += s mask (lu lv) in place", 2.0 * M * r * N,
                2 * M * N * itemsize + M * r * 4 + r * N * itemsize)


def summary(M, K, N, r, card: str, itemsize: int = 2) -> dict:
    """Roofline times (µs) of the LoRA layer and of nn.Linear, forward and forward+backward, and their
    ratio: the best multiple of nn.Linear any implementation can reach. ``lora fwd+bwd`` is the backward
    reading dY three times (two shrinks, dX), ``... one dY pass`` the "kernels-dy1" composition (twice, plus
    its partials); the timed choice runs the faster, so the bound is ``best fwd+bwd ratio``."""
    lin, lo = linear_costs(M, K, N, itemsize), lora_costs(M, K, N, r, itemsize)
    one = lora_costs(M, K, N, r, itemsize, fused_dy_pass=True)
    us = lambda costs: sum(c.seconds(card) for c in costs) * 1e6  # noqa: E731
    out = {"linear fwd": us(lin["fwd"]), "lora fwd": us(lo["fwd"]),
           "linear fwd+bwd": us(lin["fwd"] + lin["bwd"]), "lora fwd+bwd": us(lo["fwd"] + lo["bwd"]),
           "lora fwd+bwd one dY pass": us(one["fwd"] + one["bwd"])}
    out["fwd ratio"] = out["lora fwd"] / out["linear fwd"]
    out["fwd+bwd ratio"] = out["lora fwd+bwd"] / out["linear fwd+bwd"]
    out["one dY pass ratio"] = out["lora fwd+bwd one dY pass"] / out["linear fwd+bwd"]
    out["best fwd+bwd ratio"] = min(out["fwd+bwd ratio"], out["one dY pass ratio"])
    return out


def table(shapes, itemsize: int = 2) -> list:
    """Markdown lines: one row per (shape, kernel), then one summary row per shape."""
    cards = list(CARDS)
    lines = ["| M | K | N | r | kernel | computes | GFLOP | MB moved | flop/B | "
             + " | ".join(f"{c} µs ({c} bound)" for c in cards) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(cards)]
    for M, K, N, r in shapes:
        lin, lo = linear_costs(M, K, N, itemsize), lora_costs(M, K, N, r, itemsize)
        rows = (lin["fwd"] + lin["bwd"] + lo["fwd"] + lo["bwd"] + lora_costs(M, K, N, r, itemsize, True)["bwd"][:2]
                + [lowrank_add_cost(M, N, r, itemsize)])
        for c in rows:
            times = " | ".join(f"{c.seconds(card) * 1e6:.2f} ({c.bound(card)})" for card in cards)
            lines.append(f"| {M} | {K} | {N} | {r} | {c.name} | {c.what} | {c.flops / 1e9:.3f} | {c.bytes / 1e6:.2f} "
                         f"| {c.intensity:.1f} | {times} |")
    lines += ["", "Layer totals (sum of the kernels' roofline times) and the best multiple of frozen nn.Linear:", "",
              "| M | K | N | r | card | linear fwd µs | LoRA fwd µs | fwd x | linear fwd+bwd µs | LoRA fwd+bwd µs "
              "| fwd+bwd x | LoRA fwd+bwd, one dY pass µs | one dY pass x |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for M, K, N, r in shapes:
        for card in cards:
            s = summary(M, K, N, r, card, itemsize)
            lines.append(f"| {M} | {K} | {N} | {r} | {card} | {s['linear fwd']:.2f} | {s['lora fwd']:.2f} | "
                         f"{s['fwd ratio']:.3f} | {s['linear fwd+bwd']:.2f} | {s['lora fwd+bwd']:.2f} | "
                         f"{s['fwd+bwd ratio']:.3f} | {s['lora fwd+bwd one dY pass']:.2f} | "
                         f"{s['one dY pass ratio']:.3f} |")
    return lines


def _kxn(s: str) -> tuple:
    k, n = s.lower().split("x")
    return int(k), int(n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", nargs="+", type=int, help="M values (default: the issue's target shapes)")
    ap.add_argument("--shapes", nargs="+", type=_kxn, default=[(4096, 4096)], help="KxN (in x out), with --tokens")
    ap.add_argument("--ranks", nargs="+", type=int, default=[16])
    ap.add_argument("--itemsize", type=int, default=2, help="bytes per element of x, W, y (2: bf16)")
    ap.add_argument("--out", help="markdown file (default benchmarks/results/roofline-<date>.md)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    shapes = ([(m, k, n, r) for m in a.tokens for k, n in a.shapes for r in a.ranks] if a.tokens else TARGET_SHAPES)
    date = time.strftime("%Y-%m-%d")
    head = [f"# Roofline model of the LoRA kernels vs nn.Linear (offline: computed, not measured; {date})", "",
            "Peaks: " + "; ".join(f"{c} {v['flops'] / 1e12:.0f} TFLOP/s bf16 dense, {v['bandwidth'] / 1e12:.2f} TB/s"
                                  for c, v in CARDS.items())
            + f". Elements of {a.itemsize} bytes, u / v fp32. Each operand read and each result written once; "
            "time = max(flops / peak, bytes / bandwidth), a lower bound. `dY pass` + `dY pass sums` are the "
            "backward's \"kernels-dy1\" alternative to the `dY B` and `dB` rows (issue 12 item 2: one read of dY "
            f"for both, fp32 partials written and read back, cut as the launcher cuts them on {SMS} SMs; "
            "counted in HBM although they may stay in L2); `low-rank add` is the cuBLAS path's in-place update "
            "(dropout). The timed choice runs the faster backward, so a shape's bound is the lower of its two "
            "fwd+bwd columns.", ""]
    lines = head + table(shapes, a.itemsize)
    print("\n".join(lines))
    if not a.no_write:
        out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"roofline-{date}.md")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
