"""Bytes / flops model of every fastpeft kernel (LoRA, many adapters, sparse deltas, QLoRA, DoRA) and of
nn.Linear, and the time the roofline allows on an H100 / H200: what a device run (benchmarks/device_check.sh,
profile_lora.py) is read against, and which of the issues' targets the kernels can reach at all.

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
from dataclasses import dataclass, replace

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


def total_us(costs, card: str) -> float:
    """The kernels' roofline times on ``card``, summed, in µs."""
    return sum(c.seconds(card) for c in costs) * 1e6


def gemm(name: str, what: str, m: int, k: int, n: int, itemsize: int = 2, out_itemsize: int | None = None) -> Cost:
    """(m, k) @ (k, n): 2 m k n flops; reads both operands and writes the (m, n) result once."""
    out_itemsize = itemsize if out_itemsize is None else out_itemsize
    return Cost(name, what, 2.0 * m * k * n, (m * k + k * n) * itemsize + m * n * out_itemsize)


def linear_costs(M: int, K: int, N: int, itemsize: int = 2) -> dict:
    """Frozen nn.Linear (M, K) -> (M, N) with bias: its forward and its backward for dX only."""
    fwd = gemm("linear fwd", "y = x W^T + b", M, K, N, itemsize)
    fwd = replace(fwd, bytes=fwd.bytes + N * itemsize)
    dx = gemm("linear dX", "dX = dY W", M, N, K, itemsize)
    return {"fwd": [fwd], "bwd": [dx]}


TMA_BLOCK_M = 128  # every autotuned TMA config's BLOCK_M (kernels/lora_tma.py _TUNED_BLOCK_M; a test checks)
FUSED_SHRINK_MIN_ROWS = 256  # fastpeft.ops.lora's: fewer rows are not offered the fused shrink (a test checks)
DENSE_MAX_M = 64  # kernels.quant's: up to this many rows the forward is offered lora_decode (a test checks)
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


def lora_costs(M: int, K: int, N: int, r: int, itemsize: int = 2, fused_dy_pass: bool = False,
               fused_shrink: bool = False, fused_dx: bool = False) -> dict:
    """The kernels of one LoRA layer's forward and backward (frozen W, dX needed), as LoRALinearFunction
    launches them: u = drop(x) A^T and v = dY B in fp32 (4 bytes), everything else in the input dtype.

    ``fused_dy_pass``: the backward's "kernels-dy1" composition (issue 12 item 2): v = dY B and dB = s dY^T u
    from one read of dY (``_lora_dy_pass_kernel``), which writes fp32 partials (v per column chunk, dB per
    row block, ``dy_pass_layout``) that a second step adds: the pass row counts their writes, the
    "dY pass sums" row their reads and the sums' writes (none for a partial count of 1: a view).

    ``fused_shrink``: the forward's "tma-shrink" path (``lora_tma.lora_forward_tma``), one kernel: the tiles
    of column block 0 also accumulate u from the x tiles they load and publish it, the others wait for it;
    x is read once. The wait (the first wave's tiles for their producers' extra R / BLOCK_N of MMA) is not
    in the model. Up to ``DENSE_MAX_M`` rows the forward's "decode" path (``quant.lora_decode``: every
    program reads A beside its W tiles, from L2 after the first) moves the same bytes to and from HBM in
    one launch, where the kernel path launches three (shrink, partial sum, GEMM); launches are not charged
    here, so the model shows their bytes, not what the one launch saves.

    ``fused_dx``: the backward's "tma-dy" path (``lora_tma.lora_backward_tma``): dX's TMA GEMM whose tiles
    of column block 0 also accumulate v = dY B and each dY tile's dY_tile^T u into their row block's fp32
    partial of dB (row blocks of 128: ``TMA_BLOCK_M``); dY is read once for dX, v and dB; the partials are
    added in a fixed order ("dB partial sums"); dA as before.
    """
    e, f = itemsize, 4
    fwd = [
        Cost("shrink", "u = drop(x) A^T", 2.0 * M * K * r, (M * K + r * K) * e + M * r * f),
        Cost("fused GEMM", "y = x W^T + s u B^T + b", 2.0 * M * K * N + 2.0 * M * r * N,
             (M * K + N * K + N * r + N) * e + M * r * f + M * N * e),
    ]
    if fused_shrink:
        fwd = [Cost("fused GEMM + shrink", "u = drop(x) A^T, y = x W^T + s u B^T + b (x read once)",
                    fwd[0].flops + fwd[1].flops, (M * K + N * K + N * r + r * K + N) * e + M * r * f + M * N * e)]
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
    if fused_dx:
        rows = -(-M // TMA_BLOCK_M)
        dx = bwd[-1]
        bwd = [Cost("dX + dY pass", f"dX, v = dY B, dY^T u ({rows} dB partials), dY read once",
                    dx.flops + 4.0 * M * N * r, dx.bytes + N * r * e + M * r * f + rows * N * r * f),
               Cost("dB partial sums", "dB = s (partials added in a fixed order)", float(rows * N * r),
                    rows * N * r * f + N * r * e),
               bwd[-2]]
    return {"fwd": fwd, "bwd": bwd}


def lowrank_add_cost(M: int, N: int, r: int, itemsize: int = 2) -> Cost:
    """The cuBLAS path's in-place update out += s mask (lu @ lv): one read and one write of out."""
    return Cost("low-rank add", "out += s mask (lu lv) in place", 2.0 * M * r * N,
                2 * M * N * itemsize + M * r * 4 + r * N * itemsize)


# ---- the other families: many adapters, sparse deltas, QLoRA, DoRA (issue 12 item 7 "every kernel") ----

SEQ = 512  # bench multi's prefill sequence length (one adapter per sequence)


def expected_rank_sum(M: int, adapters: int, ranks: list, phase: str) -> float:
    """Expected sum of the ranks of the distinct adapters a ``fastpeft bench multi`` batch uses: adapter i has
    rank ``ranks[i % len(ranks)]``; decode draws one adapter per token uniformly, so adapter i is used with
    probability 1 - (1 - 1/n)^M; prefill gives sequence j of M / 512 adapter j % n."""
    rank = [ranks[i % len(ranks)] for i in range(adapters)]
    if phase == "decode":
        return sum(rank) * (1.0 - (1.0 - 1.0 / adapters) ** M)
    return float(sum(rank[i] for i in set(j % adapters for j in range(max(1, M // SEQ)))))


def multi_costs(M: int, K: int, N: int, rank_sum: float, r_max: int, phase: str, itemsize: int = 2) -> list:
    """Many adapters per batch, forward (serving), after the base GEMM (``linear_costs``): each distinct
    adapter's A and B read once (``rank_sum``: the sum of their ranks), x read, y read and updated in place.
    Decode: ``_multi_bgmv_kernel`` (shrink and expand in one launch, u in registers); prefill: the grouped
    shrink (u (M, r_max) fp32 written) and the grouped expand (u read, y read and written)."""
    e, f = itemsize, 4
    a_bytes, b_bytes = rank_sum * K * e, rank_sum * N * e
    if phase == "decode":
        return [Cost("bgmv", "y += s_i (x A_i^T) B_i^T, each row its adapter", 2.0 * M * r_max * (K + N),
                     M * K * e + a_bytes + b_bytes + 2 * M * N * e)]
    return [Cost("grouped shrink", "u = x A_i^T per row group", 2.0 * M * K * r_max,
                 M * K * e + a_bytes + M * r_max * f),
            Cost("grouped expand", "y += s_i u B_i^T in place", 2.0 * M * N * r_max,
                 M * r_max * f + b_bytes + 2 * M * N * e)]


def multi_fused_cost(M: int, K: int, N: int, rank_sum: float, r_max: int, itemsize: int = 2) -> Cost:
    """The prefill's fused path (``lora_tma.multi_forward_tma``, sm_90+, ids per sequence): one kernel for the
    base GEMM, the shrink (u = x A_a^T at R_PAD columns for every row, from the x tiles the GEMM loads) and
    each row block's expand as one more MMA into the accumulator; x and W read once, each distinct adapter's
    A and B once, u (M, r_max) fp32 written and read back by the row block's other tiles, y written once. A
    row block whose rows mix d adapters (sequences not multiples of 128 rows) runs d - 1 more shrinks of its
    rows, from L2: not in the model (bench multi's sequences of 512 rows mix none)."""
    e, f = itemsize, 4
    rp = max(16, 1 << (int(r_max) - 1).bit_length())
    return Cost("fused multi GEMM", "y = x W^T + b + s_i (x A_i^T) B_i^T, one kernel (x read once)",
                2.0 * M * K * N + 2.0 * M * rp * (K + N),
                (M * K + N * K + N) * e + rank_sum * (K + N) * e + 2 * M * r_max * f + M * N * e)


def multi_summary(M: int, K: int, N: int, adapters: int, ranks: list, phase: str, card: str,
                  single_rank: int | None = None, itemsize: int = 2) -> dict:
    """Roofline µs of n adapters routed per row (base GEMM + the multi kernels; at prefill the faster of that
    and the fused kernel, as the timed choice runs them) and of one adapter of rank ``single_rank`` (default
    ranks[0], bench multi's ``single``) on the same rows (its fastest forward, as the timed choice runs it:
    the shrink and the fused GEMM, or from 256 rows the fused shrink), and their ratio: the best multiple of
    one adapter that the multi kernels reach. ``grouped``: the base GEMM + grouped kernels alone."""
    us = lambda costs: total_us(costs, card)  # noqa: E731
    rank_sum = expected_rank_sum(M, adapters, ranks, phase)
    grouped = us(linear_costs(M, K, N, itemsize)["fwd"] + multi_costs(M, K, N, rank_sum, max(ranks), phase,
                                                                       itemsize))
    multi = grouped
    if phase == "prefill" and max(ranks) <= 64:
        multi = min(grouped, us([multi_fused_cost(M, K, N, rank_sum, max(ranks), itemsize)]))
    single = summary(M, K, N, single_rank or ranks[0], card, itemsize)["best lora fwd"]
    return {"rank sum": rank_sum, "multi": multi, "grouped": grouped, "single": single, "ratio": multi / single}


def sparse_costs(M: int, K: int, N: int, density: float, block: int, itemsize: int = 2,
                 tma_block_n: int | None = None) -> dict:
    """A sparse delta Δ (``density`` of W's entries, in ``block`` x ``block`` blocks; 1: unstructured), frozen
    W, dX and the values' gradient needed, as the kernels run it: blocks > 1 in the block-fused GEMM (W's
    tiles and Δ's blocks read in the K loop), unstructured through a densified W + Δ (written once in the
    forward, read by both GEMMs); the values' gradient by an SDDMM (dY and x read once, nnz dot products
    over M). Values and their gradient in fp32, indices int64 (one per entry or two per block).

    ``tma_block_n``: blocks through the TMA sparse GEMM (sm_90+, ``sparse_block_gemm_tma``) at that BLOCK_N:
    the plain GEMM plus, per block and row block, one MMA of b x BLOCK_N columns (the block placed among
    zeros): 2 M b BLOCK_N more flops per block; a's b columns come from L2 (not counted), the CSR beside
    the indices."""
    e, f = itemsize, 4
    nnz = density * N * K
    nblocks = nnz / (block * block)
    idx = (nblocks * 2 if block > 1 else nnz) * 8
    vals = nnz * f + idx
    fwd_gemm = gemm("sparse GEMM", "y = x (W + Δ)^T + b", M, K, N, e)
    dx_gemm = gemm("sparse dX", "dX = dY (W + Δ)", M, N, K, e)
    sddmm = Cost("SDDMM", "dΔ = (dY^T x) at Δ's positions", 2.0 * M * nnz, (M * N + M * K) * e + vals)
    if block > 1 and tma_block_n:
        extra = 2.0 * M * block * tma_block_n * nblocks
        csr = nblocks * 8 + (N + K) / block * 4
        fwd = [replace(fwd_gemm, what=fwd_gemm.what + f" (TMA GEMM, Δ's blocks as b x {tma_block_n} MMAs)",
                       flops=fwd_gemm.flops + extra, bytes=fwd_gemm.bytes + N * e + vals + csr)]
        bwd = [sddmm, replace(dx_gemm, what=dx_gemm.what + " (TMA GEMM)", flops=dx_gemm.flops + extra,
                              bytes=dx_gemm.bytes + vals + csr)]
    elif block > 1:
        fwd = [replace(fwd_gemm, what=fwd_gemm.what + " (Δ's blocks in the K loop)",
                       bytes=fwd_gemm.bytes + N * e + vals)]
        bwd = [sddmm, replace(dx_gemm, bytes=dx_gemm.bytes + vals)]
    else:
        fwd = [Cost("densify", "W + Δ written dense", 0.0, 2 * N * K * e + vals),
               replace(fwd_gemm, what=fwd_gemm.what + " (on the dense copy)", bytes=fwd_gemm.bytes + N * e)]
        bwd = [sddmm, dx_gemm]
    return {"fwd": fwd, "bwd": bwd}


def sparse_baseline_costs(M: int, K: int, N: int, density: float, itemsize: int = 2) -> list:
    """The clone + scatter + dense-dW path (PEFT SHiRA / RoSA style; SpIEL's dense dW too): W cloned and Δ
    scattered in, two dense GEMMs, then dW = dY^T x in full (M N K flops, an fp32 (N, K) gradient) and its
    entries at Δ's positions gathered."""
    e, f = itemsize, 4
    nnz = density * N * K
    return [Cost("clone + scatter", "W' = W.clone(); W'[idx] += Δ", 0.0, 2 * N * K * e + nnz * (f + 8)),
            (lambda g: replace(g, bytes=g.bytes + N * e))(gemm("GEMM", "y = x W'^T + b", M, K, N, e)),
            gemm("dX GEMM", "dX = dY W'", M, N, K, e),
            gemm("dense dW", "dW = dY^T x (fp32)", N, M, K, e, out_itemsize=f),
            Cost("gather", "dΔ = dW[idx]", 0.0, nnz * (f + 8) + nnz * f)]


# bitsandbytes' storage per weight element: NF4 / FP4 4 bits with an absmax per 64 (fp32, or nested: uint8
# per 64 plus fp32 per 256 of those); int8 1 byte with an fp32 scale per output row.
def quant_weight_bytes(N: int, K: int, kind: str, blocksize: int = 64) -> float:
    if kind == "int8":
        return N * K + N * 4.0
    absmax = N * K / blocksize * (1 + 4 / 256) if kind.endswith("nested") else N * K / blocksize * 4
    return N * K / 2 + absmax


def qlora_costs(M: int, K: int, N: int, r: int, kind: str, path: str, itemsize: int = 2,
                fused_shrink: bool = False) -> dict:
    """LoRA over a bitsandbytes base (``kind`` "nf4-nested" / "nf4" / "int8"). ``path`` "dequant": one pass
    dequantizes W into a shared bf16 workspace (packed bytes read, N K elements written), then the LoRA
    kernels as for a bf16 W; the backward dequantizes again for dX = dY W. "fused": the GEMM dequantizes W's
    tiles in its K loop (the packed bytes are all it reads of W). ``fused_shrink`` (dequant path): bf16 LoRA's
    forward on the workspace with the shrink fused into the TMA GEMM."""
    e = itemsize
    wq = quant_weight_bytes(N, K, kind)
    lo = lora_costs(M, K, N, r, itemsize, fused_shrink=fused_shrink and path == "dequant")
    if path == "fused":  # the GEMMs read the packed bytes instead of a bf16 W
        return {"fwd": [replace(c, name="fused dequant GEMM", bytes=c.bytes - N * K * e + wq)
                        if c.name == "fused GEMM" else c for c in lo["fwd"]],
                "bwd": [replace(c, bytes=c.bytes - N * K * e + wq) if c.name == "dX fused" else c for c in lo["bwd"]]}
    deq = Cost("dequant pass", f"W ({kind}) -> bf16 workspace", 0.0, wq + N * K * e)
    return {"fwd": [deq] + lo["fwd"], "bwd": [deq] + lo["bwd"]}


def dequant_gemm_costs(M: int, K: int, N: int, kind: str, itemsize: int = 2) -> list:
    """The decode baseline of issue 15 (Unsloth-style): dequantize W into a temporary, then one GEMM."""
    return [Cost("dequantize", f"W ({kind}) -> bf16", 0.0, quant_weight_bytes(N, K, kind) + N * K * itemsize)] \
        + linear_costs(M, K, N, itemsize)["fwd"]


def dora_costs(M: int, K: int, N: int, r: int, itemsize: int = 2, fused_shrink: bool = False,
               fused_dx: bool = False) -> dict:
    """DoRA in training (dropout 0, the plain mode), as DoRALinearFunction launches it. Forward: the norm
    ‖W_j + s B_j A‖ from the cached ‖W_j‖², W A^T (one read of W: A and B change every step) and A A^T;
    the shrink; the LoRA GEMM with g = m / n and b in its epilogue. Backward: one pass over dY and the saved
    y for v = (dY ⊙ g) B and dm (z = (y - b) / g), dB = s diag(g) dY^T u, dA, dX as LoRA's.
    ``fused_shrink``: the shrink fused into the TMA GEMM, g in its epilogue (``lora_costs``' fused_shrink).
    ``fused_dx``: dX's TMA GEMM on G = dY ⊙ g (formed in registers) whose column-block-0 tiles also give v,
    dB's and dm's per-row-block partials (``lora_tma.dora_backward_tma``): dY and y read once, inside the
    GEMM."""
    e, f = itemsize, 4
    lo = lora_costs(M, K, N, r, itemsize, fused_shrink=fused_shrink)
    norm = Cost("norm", "n = ‖W + s B A‖_row (W A^T, A A^T; ‖W‖² cached)", 2.0 * N * K * r + 2.0 * r * r * K
                + 4.0 * N * r * r, N * K * e + r * K * e + N * r * e + N * f * 2)
    gemm_g = [replace(c, name=c.name + " (g epilogue)", what="y = g ⊙ (x W^T + s u B^T) + b", flops=c.flops + M * N,
                      bytes=c.bytes + N * f) if c.name.startswith("fused GEMM") else c for c in lo["fwd"]]
    dy, db = lo["bwd"][0], lo["bwd"][1]
    bwd = [Cost("dY pass", "v = (dY ⊙ g) B, dm = Σ_i dY (y - b) / m", dy.flops + 2.0 * M * N,
                dy.bytes + M * N * e + N * f * 2), db] + lo["bwd"][2:]
    if fused_dx:
        fx = lora_costs(M, K, N, r, itemsize, fused_dx=True)["bwd"]
        rows = -(-M // TMA_BLOCK_M)
        bwd = [replace(fx[0], name="dX + dY pass (G, dm)", what=fx[0].what + "; y read, dm partials",
                       flops=fx[0].flops + 3.0 * M * N, bytes=fx[0].bytes + M * N * e + N * e + rows * N * f),
               replace(fx[1], name="dB, dm partial sums", flops=fx[1].flops + rows * N,
                       bytes=fx[1].bytes + rows * N * f + N * f)] + fx[2:]
    return {"fwd": [norm] + gemm_g, "bwd": bwd}


def targets(card: str, itemsize: int = 2) -> list:
    """``(issue, target, shape, allowed, bound)``: each speed target of issues 12, 15 and 16 beside the best
    ratio the roofline allows on ``card``. A bound above its target means no kernel can meet it there."""
    us = lambda costs: total_us(costs, card)  # noqa: E731
    out = []
    for shape in [(8192, 4096, 4096, 16), (8192, 4096, 14336, 8), (8192, 4096, 14336, 64), (8192, 14336, 4096, 8),
                  (8192, 14336, 4096, 64)]:
        s = summary(*shape, card, itemsize)
        name = "M{} K{} N{} r{}".format(*shape)
        out += [("12 P1", "LoRA fwd / nn.Linear", name, 1.06, s["best fwd ratio"]),
                ("12 P2", "LoRA fwd+bwd / nn.Linear (p 0; p 0.1: 1.12, same bytes)", name, 1.10,
                 s["best fwd+bwd ratio"])]
    for m in (1, 16, 64):
        s = summary(m, 4096, 4096, 16, card, itemsize)
        out.append(("12 P1b", "LoRA decode / nn.Linear (CUDA graphs)", f"M{m} K4096 N4096 r16", 1.10,
                    s["best fwd ratio"]))
    mixed = [8, 16, 32, 64]
    for phase, m, allowed in (("prefill", 8192, 1.10), ("decode", 64, 1.25)):
        s = multi_summary(m, 4096, 4096, 64, mixed, phase, card, itemsize=itemsize)
        out.append(("12 P4", f"64 adapters (ranks 8-64) / one adapter (r 8), {phase}",
                    f"M{m} K4096 N4096, rank sum {s['rank sum']:.0f}", allowed, s["ratio"]))
    lin = linear_costs(8192, 4096, 4096, itemsize)
    lin_t = us(lin["fwd"] + lin["bwd"])
    sp = sparse_costs(8192, 4096, 4096, 0.01, 32, itemsize)
    out.append(("12 P5", "sparse Δ 1 %, 32x32 blocks, fwd+bwd / nn.Linear", "M8192 K4096 N4096", 1.15,
                us(sp["fwd"] + sp["bwd"]) / lin_t))
    tma = sparse_costs(8192, 4096, 4096, 0.01, 32, itemsize, tma_block_n=128)
    out.append(("12 P5", "the same through the TMA sparse GEMM (sm_90+, BLOCK_N 128)", "M8192 K4096 N4096", 1.15,
                us(tma["fwd"] + tma["bwd"]) / lin_t))
    un = sparse_costs(8192, 4096, 4096, 0.01, 1, itemsize)
    out.append(("12 P5", "sparse Δ 1 % unstructured, fwd+bwd / clone+scatter+dense-dW", "M8192 K4096 N4096", 1.0,
                us(un["fwd"] + un["bwd"]) / us(sparse_baseline_costs(8192, 4096, 4096, 0.01, itemsize))))
    # At M 8192 the timed choices run bf16 LoRA's fastest forward and backward, and QLoRA's dequant path runs
    # the same on the workspace, after a dequant pass in each direction.
    s = summary(8192, 4096, 4096, 16, card, itemsize)
    lo_fwd, lo_bwd = s["best lora fwd"], s["best lora bwd"]
    deq = us(qlora_costs(8192, 4096, 4096, 16, "nf4-nested", "dequant", itemsize)["fwd"][:1])
    out += [("15", "QLoRA (NF4 nested) fwd / bf16 LoRA", "M8192 K4096 N4096 r16", 1.05, (deq + lo_fwd) / lo_fwd),
            ("15", "QLoRA (NF4 nested) fwd+bwd / bf16 LoRA", "M8192 K4096 N4096 r16", 1.05,
             (2 * deq + lo_fwd + lo_bwd) / (lo_fwd + lo_bwd))]
    for m in (1, 16):
        qf = qlora_costs(m, 4096, 4096, 16, "nf4-nested", "fused", itemsize)
        out += [("15", "QLoRA decode (fused) / dequantize + GEMM (target: 2.5x faster)", f"M{m} K4096 N4096 r16",
                 1 / 2.5, us(qf["fwd"]) / us(dequant_gemm_costs(m, 4096, 4096, "nf4-nested", itemsize))),
                ("15", "QLoRA decode (fused) / bf16 nn.Linear", f"M{m} K4096 N4096 r16", 1.0,
                 us(qf["fwd"]) / us(linear_costs(m, 4096, 4096, itemsize)["fwd"]))]
    d = dora_costs(8192, 4096, 4096, 16, itemsize)
    d_fwd = min(us(d["fwd"]), us(dora_costs(8192, 4096, 4096, 16, itemsize, fused_shrink=True)["fwd"]))
    d_bwd = min(us(d["bwd"]), us(dora_costs(8192, 4096, 4096, 16, itemsize, fused_dx=True)["bwd"]))
    out += [("16", "DoRA fwd / nn.Linear", "M8192 K4096 N4096 r16", 1.10, d_fwd / us(lin["fwd"])),
            ("16", "DoRA fwd+bwd / nn.Linear", "M8192 K4096 N4096 r16", 1.20, (d_fwd + d_bwd) / lin_t),
            ("16", "DoRA fwd+bwd / fastpeft LoRA", "M8192 K4096 N4096 r16", 1.08,
             (d_fwd + d_bwd) / (lo_fwd + lo_bwd))]
    return out


def targets_table(itemsize: int = 2) -> list:
    """Markdown lines: every target beside its roofline bound on each card."""
    cards = list(CARDS)
    lines = ["| issue | target | shape | allowed | " + " | ".join(f"{c} bound" for c in cards) + " | reachable |",
             "|---|---|---|---|" + "---|" * len(cards) + "---|"]
    rows = {card: targets(card, itemsize) for card in cards}
    for i, (issue, what, shape, allowed, _) in enumerate(rows[cards[0]]):
        bounds = [rows[c][i][4] for c in cards]
        ok = ["yes" if b <= allowed else "no" for b in bounds]
        reach = ok[0] if len(set(ok)) == 1 else ", ".join(f"{c}: {o}" for c, o in zip(cards, ok))
        lines.append(f"| {issue} | {what} | {shape} | {allowed:.2f}x | "
                     + " | ".join(f"{b:.3f}x" for b in bounds) + f" | {reach} |")
    return lines


def summary(M, K, N, r, card: str, itemsize: int = 2) -> dict:
    """Roofline times (µs) of the LoRA layer and of nn.Linear, forward and forward+backward, and their
    ratio: the best multiple of nn.Linear that fastpeft's kernels can reach. ``lora fwd`` is the shrink
    (reading x on its own) and the fused GEMM, ``lora fwd, fused shrink`` the one kernel of the
    "tma-shrink" path (sm_90: x read once). ``lora fwd+bwd`` is the backward reading dY three times (two
    shrinks, dX), ``... one dY pass`` the "kernels-dy1" composition (twice, plus its partials). The timed
    choices run the faster of each, so the bounds are ``best fwd ratio`` and ``best fwd+bwd ratio``."""
    lin, lo = linear_costs(M, K, N, itemsize), lora_costs(M, K, N, r, itemsize)
    one = lora_costs(M, K, N, r, itemsize, fused_dy_pass=True)
    fs = lora_costs(M, K, N, r, itemsize, fused_shrink=True)["fwd"]
    us = lambda costs: total_us(costs, card)  # noqa: E731
    out = {"linear fwd": us(lin["fwd"]), "lora fwd": us(lo["fwd"]), "lora fwd, fused shrink": us(fs),
           "linear fwd+bwd": us(lin["fwd"] + lin["bwd"]), "lora fwd+bwd": us(lo["fwd"] + lo["bwd"]),
           "lora fwd+bwd one dY pass": us(one["fwd"] + one["bwd"])}
    # The forward is offered the fused shrink from FUSED_SHRINK_MIN_ROWS rows (fastpeft/ops/lora.py) and, up to
    # DENSE_MAX_M rows, the one-launch decode kernel, whose traffic is the fused shrink's.
    one_kernel = M >= FUSED_SHRINK_MIN_ROWS or M <= DENSE_MAX_M
    best_fwd = min(out["lora fwd"], out["lora fwd, fused shrink"]) if one_kernel else out["lora fwd"]
    out["fwd ratio"] = out["lora fwd"] / out["linear fwd"]
    out["fused shrink fwd ratio"] = out["lora fwd, fused shrink"] / out["linear fwd"]
    out["best fwd ratio"] = best_fwd / out["linear fwd"]
    out["fwd+bwd ratio"] = out["lora fwd+bwd"] / out["linear fwd+bwd"]
    out["one dY pass ratio"] = out["lora fwd+bwd one dY pass"] / out["linear fwd+bwd"]
    fdx = lora_costs(M, K, N, r, itemsize, fused_dx=True)["bwd"]
    out["lora bwd, fused dY pass"] = us(fdx)
    # The backward is offered the fused dY pass from FUSED_SHRINK_MIN_ROWS rows, as the forward its shrink.
    best_bwd = min(us(lo["bwd"]), us(one["bwd"]), us(fdx) if M >= FUSED_SHRINK_MIN_ROWS else float("inf"))
    out["best lora fwd"], out["best lora bwd"] = best_fwd, best_bwd
    out["best fwd+bwd ratio"] = (best_fwd + best_bwd) / out["linear fwd+bwd"]
    return out


def table(shapes, itemsize: int = 2) -> list:
    """Markdown lines: one row per (shape, kernel), then one summary row per shape."""
    cards = list(CARDS)
    lines = ["| M | K | N | r | kernel | computes | GFLOP | MB moved | flop/B | "
             + " | ".join(f"{c} µs ({c} bound)" for c in cards) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(cards)]
    for M, K, N, r in shapes:
        lin, lo = linear_costs(M, K, N, itemsize), lora_costs(M, K, N, r, itemsize)
        rows = (lin["fwd"] + lin["bwd"] + lo["fwd"] + lora_costs(M, K, N, r, itemsize, fused_shrink=True)["fwd"]
                + lo["bwd"] + lora_costs(M, K, N, r, itemsize, True)["bwd"][:2]
                + lora_costs(M, K, N, r, itemsize, fused_dx=True)["bwd"][:2] + [lowrank_add_cost(M, N, r, itemsize)])
        for c in rows:
            times = " | ".join(f"{c.seconds(card) * 1e6:.2f} ({c.bound(card)})" for card in cards)
            lines.append(f"| {M} | {K} | {N} | {r} | {c.name} | {c.what} | {c.flops / 1e9:.3f} | {c.bytes / 1e6:.2f} "
                         f"| {c.intensity:.1f} | {times} |")
    lines += ["", "Layer totals (sum of the kernels' roofline times) and the best multiple of frozen nn.Linear:", "",
              "| M | K | N | r | card | linear fwd µs | LoRA fwd µs | fwd x | fused shrink µs | fused shrink x "
              "| linear fwd+bwd µs | LoRA fwd+bwd µs | fwd+bwd x | LoRA fwd+bwd, one dY pass µs | one dY pass x "
              "| best fwd+bwd x |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for M, K, N, r in shapes:
        for card in cards:
            s = summary(M, K, N, r, card, itemsize)
            lines.append(f"| {M} | {K} | {N} | {r} | {card} | {s['linear fwd']:.2f} | {s['lora fwd']:.2f} | "
                         f"{s['fwd ratio']:.3f} | {s['lora fwd, fused shrink']:.2f} | "
                         f"{s['fused shrink fwd ratio']:.3f} "
                         f"| {s['linear fwd+bwd']:.2f} | {s['lora fwd+bwd']:.2f} | {s['fwd+bwd ratio']:.3f} | "
                         f"{s['lora fwd+bwd one dY pass']:.2f} | {s['one dY pass ratio']:.3f} | "
                         f"{s['best fwd+bwd ratio']:.3f} |")
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
    head = [f"# Roofline model of the fastpeft kernels vs nn.Linear (offline: computed, not measured; {date})", "",
            "Peaks: " + "; ".join(f"{c} {v['flops'] / 1e12:.0f} TFLOP/s bf16 dense, {v['bandwidth'] / 1e12:.2f} TB/s"
                                  for c, v in CARDS.items())
            + f". Elements of {a.itemsize} bytes, u / v fp32. Each operand read and each result written once; "
            "time = max(flops / peak, bytes / bandwidth), a lower bound. `dY pass` + `dY pass sums` are the "
            "backward's \"kernels-dy1\" alternative to the `dY B` and `dB` rows (issue 12 item 2: one read of dY "
            f"for both, fp32 partials written and read back, cut as the launcher cuts them on {SMS} SMs; "
            "counted in HBM although they may stay in L2); `low-rank add` is the cuBLAS path's in-place update "
            "(dropout). `fused GEMM + shrink` is the forward's \"tma-shrink\" path (sm_90+, from 256 rows): one "
            "kernel, x read once; the wait of the first tiles for their row block's u is not modelled. The timed "
            "choices run the faster forward and backward: `best fwd+bwd x`.", ""]
    lines = head + table(shapes, a.itemsize)
    if not a.tokens:  # the targets of issues 12, 15 and 16 are at the default shapes
        lines += ["", "## The issues' speed targets against the roofline", "",
                  "Each target of issues 12 (LoRA P1 / P1b / P2, many adapters P4, sparse P5), 15 (QLoRA) and 16 "
                  "(DoRA) beside the lowest ratio the model allows for the kernels fastpeft launches (each at its "
                  "roofline, summed). `no`: those kernels cannot meet the target on that card, however well tuned. "
                  "Many adapters: bench multi's setup (adapter i of rank 8 / 16 / 32 / 64 cycling; decode draws an "
                  "adapter per token; prefill one per 512-token sequence, through the faster of the grouped "
                  "kernels and the fused multi-adapter GEMM; `single` one adapter of rank 8); its "
                  "decode bound holds for any implementation: the distinct adapters' A and B (the rank sum times "
                  "(K + N) bf16 elements) must be read beside W. QLoRA: NF4 with nested absmax (0.52 bytes per "
                  "weight); fwd at M=8192 through the dequant pass, decode through the fused kernel. DoRA: "
                  "training, dropout 0 (its norm reads W once per step). Forwards from 256 rows: the faster of "
                  "the two-kernel and the fused-shrink forward, as the timed choice runs them (LoRA, QLoRA's "
                  "dequant path, DoRA's plain forward); LoRA up to 64 rows: the one-launch decode kernel, whose "
                  "traffic is the fused shrink's. Launches are not charged: at decode the kernel path's three "
                  "launches (shrink, partial sum, GEMM) against the decode kernel's one are what the device "
                  "run's CUDA-graph column shows.", ""] + targets_table(a.itemsize)
    print("\n".join(lines))
    if not a.no_write:
        out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"roofline-{date}.md")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
