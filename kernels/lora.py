"""Fused LoRA kernels and their launchers, registered as ``torch.library`` ops (``fastpeft::...``).

Two kernels cover the forward and the backward of ``y = x W^T + b + s * (drop(x) A^T) B^T``, a third saves
the backward one read of dY:

- ``_lora_shrink_kernel``: a narrow GEMM ``out (P, R) = scale * drop(a) (P, Q) @ b (Q, R)`` in fp32, with
  the dropout mask redrawn inside the load of ``a`` from a Philox seed (never read from memory) and an
  optional split of the reduction over Q into partial sums that are added in a fixed order afterwards
  (no atomics: the same bits every run). Forward ``u = drop(x) A^T``; backward ``v = dY B``,
  ``dB = s dY^T u`` and ``dA^T = s drop(x)^T v`` are all this kernel on strided views.
- ``_lora_gemm_kernel``: ``out (M, N) = a (M, K) @ b (K, N) + scale * mask * (lu (M, R) @ lv (R, N)) + bias``,
  a tiled GEMM whose epilogue adds the rank-R update, so the M x N LoRA product never reaches memory.
  Forward ``y = x W^T + s u B^T + b``; backward ``dX = dY W + s mask * (v A) / (1 - p)``.
- ``_lora_dy_pass_kernel``: ``v = dY B`` (M, R) and ``dB = s dY^T u`` (N, R), both fp32, from one read of
  each dY tile (the two shrinks above read dY twice); v's partials over column chunks and dB's over row
  blocks are added in a fixed order.

The cuBLAS alternative (``gemm="cublas"``) computes the base GEMM with ``torch.addmm`` / ``torch.mm`` and
adds the rank-R update in place: ``addmm_`` without dropout, ``_lora_lowrank_add_kernel`` with it (one
read and one write of the output, the mask redrawn). The dropout mask of element (m, k) of x (as M x K)
is kept when ``draw(seed, m * K + k) >= threshold``, where ``draw(seed, e)`` is word ``e % 4`` of the
Philox4x32-10 block at counter ``e // 4`` (``_keep_mask``), bit-identical to
``fastpeft.reference.dropout_mask``. Every launcher's ``seed`` is an int, or a one-element int64 tensor on
the device (a seed drawn inside a torch.compile region) that the kernels read from memory. Launchers take
their arguments by name too; the mask arguments default to no dropout.

What the kernel modules share (the mask, dots, casts, tile order, block tables, split heuristic, the
``torch.library`` plumbing) is in ``_common.py``. This module imports only torch and triton.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from . import INTERPRET, getenv, is_deterministic
from ._common import (_HAS_TRITON_OP, _cast, _dot_precision, _grouped_tile, _keep_mask, _keep_mask_tile,
                      _library_op, _lowrank_bias_part, _mma, _op_body, _seed, _sm_count, _tile_ranges, _upcast,
                      _use_explicit_blocks, _wrap, block_setter, capturing, eager_or_op, fit_stages, narrow_blocks,
                      r_pad, scale_onto_lv, split_chunk, split_count)

# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _lowrank_tile(lu_ptr, lv_ptr, rm, rn, m_ok, n_ok, N, R, stride_lum, stride_lur, stride_lvr, stride_lvn,
                  seed, threshold, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 tile (BLOCK_M, BLOCK_N) of mask * (lu @ lv) at rows rm, columns rn of an (M, N) output."""
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    lu = tl.load(lu_ptr + rm[:, None].to(tl.int64) * stride_lum + rr[None, :] * stride_lur,
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    lv = tl.load(lv_ptr + rr[:, None] * stride_lvr + rn[None, :].to(tl.int64) * stride_lvn,
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    low = _mma(_cast(lu, lv.dtype, UPCAST), lv, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION,
               UPCAST)
    if HAS_MASK:
        offs = rm[:, None].to(tl.int64) * N + rn[None, :].to(tl.int64)
        low = tl.where(_keep_mask(seed, offs, threshold), low, 0.0)
    return low


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_shrink_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr,
    # sizes
    P, Q, R, q_per_split,
    # strides
    stride_ap, stride_aq, stride_bq, stride_br, stride_os, stride_op, stride_or,
    # dropout: element (p, q) of a is masked by draw(seed, p * mask_sp + q * mask_sq) >= threshold
    seed, threshold, mask_sp, mask_sq, scale,
    # meta-parameters
    HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rr = tl.arange(0, R_PAD)
    p_ok = rp < P
    r_ok = rr < R
    q_start = pid_s * q_per_split
    q_end = tl.minimum(q_start + q_per_split, Q)
    acc = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        q_ok = rq < q_end
        a = tl.load(a_ptr + rp[:, None].to(tl.int64) * stride_ap + rq[None, :].to(tl.int64) * stride_aq,
                    mask=p_ok[:, None] & q_ok[None, :], other=0.0)
        if HAS_MASK:
            offs = rp[:, None].to(tl.int64) * mask_sp + rq[None, :].to(tl.int64) * mask_sq
            a = tl.where(_keep_mask(seed, offs, threshold), a, 0.0)
        b = tl.load(b_ptr + rq[:, None].to(tl.int64) * stride_bq + rr[None, :] * stride_br,
                    mask=q_ok[:, None] & r_ok[None, :], other=0.0)
        # b may be fp32 (u, v) beside a low-precision a: the tensor cores take one dtype.
        acc = _mma(a, _cast(b, a.dtype, UPCAST), acc, DOT_PRECISION, UPCAST)
    acc = acc * scale
    out = out_ptr + pid_s.to(tl.int64) * stride_os + rp[:, None].to(tl.int64) * stride_op + rr[None, :] * stride_or
    tl.store(out, acc, mask=p_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_gemm_kernel(
    # pointers
    a_ptr, b_ptr, lu_ptr, lv_ptr, bias_ptr, out_ptr,
    # sizes (M_KEY: M rounded up to a power of two, only an autotuning key)
    M, N, K, R, M_KEY,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_lum, stride_lur, stride_lvr, stride_lvn,
    stride_om, stride_on,
    # low-rank term: scale * mask * (lu @ lv), mask of (m, n) from draw(seed, m * N + n) >= threshold
    scale, seed, threshold,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn, rk, m_ok, n_ok = _tile_ranges(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue. s is folded into u: scale * (lu @ lv) = (scale * lu) @ lv, with scale * lu rounded once to
    # lv's dtype (the tensor cores take one dtype). Without a mask the rank-R update is one more MMA into
    # the same accumulator: no second (BLOCK_M, BLOCK_N) fp32 tile is ever live, which is what made every
    # big config spill (sm_90, triton 3.9: 128x256x64 w8 255 regs + 544 B of stack before, see
    # benchmarks/results/sm90-resources-*.md).
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    lu = tl.load(lu_ptr + rm[:, None].to(tl.int64) * stride_lum + rr[None, :] * stride_lur,
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    lu = _cast(lu.to(tl.float32) * scale, lv_ptr.dtype.element_ty, UPCAST)
    if not HAS_MASK:
        lv = tl.load(lv_ptr + rr[:, None] * stride_lvr + rn[None, :].to(tl.int64) * stride_lvn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(lu, lv, acc, DOT_PRECISION, UPCAST)
        _gemm_epilogue(acc, lu, rm, m_ok, pid_n * BLOCK_N, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr, stride_lvn,
                       stride_om, stride_on, seed, threshold, HAS_BIAS, False, BLOCK_M, BLOCK_N, R_PAD,
                       DOT_PRECISION, UPCAST)
    else:
        # The mask applies to the product, so the update cannot go into the accumulator before it: it is
        # formed and masked in sub-tiles of at most 64 columns (the accumulator split in halves with
        # tl.split), so the Philox draws (4 words per element, int64 offsets) and the product live for a
        # quarter of the tile at most.
        n0 = pid_n * BLOCK_N
        if BLOCK_N <= 64:
            _gemm_epilogue(acc, lu, rm, m_ok, n0, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr, stride_lvn,
                           stride_om, stride_on, seed, threshold, HAS_BIAS, True, BLOCK_M, BLOCK_N, R_PAD,
                           DOT_PRECISION, UPCAST)
        else:
            H: tl.constexpr = BLOCK_N // 2
            if H <= 64:
                _gemm_epilogue_halves(acc, lu, rm, m_ok, n0, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr, stride_lvn,
                                      stride_om, stride_on, seed, threshold, HAS_BIAS, BLOCK_M, H, R_PAD,
                                      DOT_PRECISION, UPCAST)
            else:
                Q: tl.constexpr = H // 2
                h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, H)), (0, 2, 1)))
                _gemm_epilogue_halves(h0, lu, rm, m_ok, n0, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr, stride_lvn,
                                      stride_om, stride_on, seed, threshold, HAS_BIAS, BLOCK_M, Q, R_PAD,
                                      DOT_PRECISION, UPCAST)
                _gemm_epilogue_halves(h1, lu, rm, m_ok, n0 + H, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr,
                                      stride_lvn, stride_om, stride_on, seed, threshold, HAS_BIAS, BLOCK_M, Q, R_PAD,
                                      DOT_PRECISION, UPCAST)


@triton.jit
def _gemm_epilogue_halves(acc, lu, rm, m_ok, n0, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr, stride_lvn, stride_om,
                          stride_on, seed, threshold, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, H: tl.constexpr,
                          R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The masked ``_gemm_epilogue`` of columns [n0, n0 + 2 H), acc (BLOCK_M, 2 H), one half at a time."""
    h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, H)), (0, 2, 1)))
    _gemm_epilogue(h0, lu, rm, m_ok, n0, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr, stride_lvn, stride_om,
                   stride_on, seed, threshold, HAS_BIAS, True, BLOCK_M, H, R_PAD, DOT_PRECISION, UPCAST)
    _gemm_epilogue(h1, lu, rm, m_ok, n0 + H, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr, stride_lvn, stride_om,
                   stride_on, seed, threshold, HAS_BIAS, True, BLOCK_M, H, R_PAD, DOT_PRECISION, UPCAST)


@triton.jit
def _gemm_epilogue(acc, lu, rm, m_ok, n0, lv_ptr, bias_ptr, out_ptr, N, R, stride_lvr, stride_lvn, stride_om,
                   stride_on, seed, threshold, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK_M: tl.constexpr, SUB_N: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    """Store columns [n0, n0 + SUB_N) of a GEMM tile: acc (BLOCK_M, SUB_N) fp32, plus (HAS_MASK) the masked
    rank-R update mask * (lu @ lv) with lu (BLOCK_M, R_PAD) already scaled, plus the bias."""
    acc, rn, n_ok = _lowrank_bias_part(acc, lu, rm, n0, lv_ptr, bias_ptr, N, R, stride_lvr, stride_lvn, seed, threshold,
                                       HAS_BIAS, HAS_MASK, False, BLOCK_M, SUB_N, R_PAD, DOT_PRECISION, UPCAST)
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :].to(tl.int64) * stride_on
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_lowrank_add_kernel(
    # pointers
    out_ptr, lu_ptr, lv_ptr,
    # sizes
    M, N, R,
    # strides
    stride_om, stride_on, stride_lum, stride_lur, stride_lvr, stride_lvn,
    # out += scale * mask * (lu @ lv), mask of (m, n) from draw(seed, m * N + n) >= threshold
    scale, seed, threshold,
    # meta-parameters
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    low = _lowrank_tile(lu_ptr, lv_ptr, rm, rn, m_ok, n_ok, N, R, stride_lum, stride_lur, stride_lvr, stride_lvn,
                        seed, threshold, False, BLOCK_M, BLOCK_N, R_PAD, DOT_PRECISION, UPCAST)
    if HAS_MASK:
        # One Philox draw per 4 columns (_keep_mask_tile): at R_PAD 64 the per-element draw spilled 112 B
        # (sm_90, triton 3.9, 64x128 w4).
        if N % 4 == 0:
            keep = _keep_mask_tile(seed, rm, n0, N, threshold, BLOCK_M, BLOCK_N, True)
        else:
            keep = _keep_mask_tile(seed, rm, n0, N, threshold, BLOCK_M, BLOCK_N, False)
        low = tl.where(keep, low, 0.0)
    ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :].to(tl.int64) * stride_on
    ok = m_ok[:, None] & n_ok[None, :]
    cur = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, _cast(cur + low * scale, out_ptr.dtype.element_ty, UPCAST), mask=ok)


@triton.jit
def _lora_dy_pass_kernel(
    # pointers
    dy_ptr, b_ptr, u_ptr, v_ptr, db_ptr,
    # sizes (M_KEY: M rounded up to a power of two, only an autotuning key)
    M, N, R, n_per_split, M_KEY,
    # strides (v_ptr: (split, M, R) partials over column chunks; db_ptr: (cdiv(M, BLOCK_M), N, R) over row blocks)
    stride_dym, stride_dyn, stride_bn, stride_br, stride_um, stride_ur, stride_vs, stride_vm, stride_vr,
    stride_dbs, stride_dbn, stride_dbr,
    # dB's scale s
    scale,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (i, j) reads the dY tile rows [i BLOCK_M, (i + 1) BLOCK_M) x column chunk j once, BLOCK_N
    columns at a time, and from each tile both v += dY_tile B_tile (v for its rows, in registers across the
    chunk) and dB_tile = s dY_tile^T u_rows (complete over its BLOCK_M rows: stored at once as row block i's
    partial). No atomics: every partial element is written by exactly one program and the launcher adds
    them in a fixed order."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    # u's rows of this program, read once; in dY's dtype for the tensor cores (as the shrink kernel casts it).
    u = tl.load(u_ptr + rm[:, None].to(tl.int64) * stride_um + rr[None, :] * stride_ur,
                mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    u = _cast(u, dy_ptr.dtype.element_ty, UPCAST)
    v = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_end
        dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rn[None, :].to(tl.int64) * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        v = _mma(dy, _cast(b, dy.dtype, UPCAST), v, DOT_PRECISION, UPCAST)
        db = _mma(tl.trans(dy), u, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), DOT_PRECISION, UPCAST)
        tl.store(db_ptr + pid_m.to(tl.int64) * stride_dbs + rn[:, None].to(tl.int64) * stride_dbn
                 + rr[None, :] * stride_dbr, db * scale, mask=n_ok[:, None] & r_ok[None, :])
    tl.store(v_ptr + pid_s.to(tl.int64) * stride_vs + rm[:, None].to(tl.int64) * stride_vm + rr[None, :] * stride_vr,
             v, mask=m_ok[:, None] & r_ok[None, :])


# Autotuned GEMM for GPUs. Configs are Triton's matmul-tutorial set for tensor-core GPUs (bf16/fp16);
# not yet tuned on a card of ours: device_check.sh times them against cuBLAS.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
    ]
]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """The configs the autotuner times. With the dropout mask (dX) only those whose fp32 accumulator takes
    at most 64 registers a thread (BLOCK_M * BLOCK_N <= 64 * 32 * num_warps): the masked epilogue needs
    the other half of the register file for its Philox draws and the update sub-tile. Compiled for sm_90
    (triton 3.9, bf16), 128x256 w8, 256x128 w8 and 128x128 w4 spill 136-1120 B with the mask, the kept
    ones none (benchmarks/results/sm90-resources-*.md); without the mask every config fits."""
    if not kwargs.get("HAS_MASK", named_args.get("HAS_MASK", False)):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps]


_lora_gemm_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M_KEY", "N", "K", "R_PAD", "HAS_MASK"],
                                   prune_configs_by={"early_config_prune": _prune_gemm_configs})(_lora_gemm_kernel)

# Explicit blocks for the interpreter and tests (overridable with set_test_blocks): small, so that odd
# sizes cross block edges in both dimensions.
_TEST_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "BLOCK_P": 32, "BLOCK_Q": 32}


set_test_blocks = block_setter(_TEST_BLOCKS)

# Deterministic mode (fastpeft.set_deterministic) launches the autotuned GEMMs with this one config
# instead: the autotuner's pick can differ between processes, and with its BLOCK_K the order of the sums.
# Not timed against the tuned configs; sized to fit shared memory on sm_80 and later also for fp32 inputs:
# compiled for sm_80 (triton 3.9), the LoRA and block-sparse GEMMs take at most 96 KiB (fp32, R_PAD=128),
# 32 KiB in bf16.
_PINNED_GEMM = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def gemm_launch_config(t: torch.Tensor, test_blocks: dict) -> dict | None:
    """Launch parameters of a tiled GEMM kernel (blocks, warps, stages) for operands like ``t``, or None
    to autotune: the explicit ``test_blocks`` under the interpreter and FASTPEFT_AUTOTUNE=0, the one pinned
    config in deterministic mode."""
    if _use_explicit_blocks(t):
        blocks = {k: test_blocks[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        return dict(blocks, num_warps=4, num_stages=1)
    if is_deterministic():
        return dict(_PINNED_GEMM)
    return None


# The dY pass (``_lora_dy_pass_kernel``): a bandwidth-bound sweep of dY. BLOCK_M is the launcher's (it fixes
# the number of dB partials, so the autotuner must not change it): rows = min(256, 8192 / R_PAD), so the fp32
# v accumulator takes 32 KiB (32 registers a thread at 8 warps). The autotuner times BLOCK_N, warps and
# stages only, which leave the partial layout alone. Not yet timed on a card. sm_90 (triton 3.9, bf16): all
# spill-free, 80-190 registers (benchmarks/results/sm90-resources-*.md); with fp32 inputs BN64 w4 spills
# (160-416 B) and BN128 exceeds shared memory at R_PAD 16 (the autotuner skips it); the pinned one fits both.
_DY_PASS_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bn, w, st in [(64, 8, 3), (32, 8, 4), (128, 8, 2), (64, 4, 3)]
]
_lora_dy_pass_tuned = triton.autotune(configs=_DY_PASS_CONFIGS, key=["M_KEY", "N", "R_PAD", "BLOCK_M"])(
    _lora_dy_pass_kernel)
# Deterministic mode: the first config (BLOCK_N sets the order of v's sums), with fewer stages where its tiles
# would not fit shared memory (``pinned_dy_pass``).
_PINNED_DY_PASS = {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def pinned_dy_pass(block_m: int, rp: int, itemsize: int) -> dict:
    """``_PINNED_DY_PASS`` for BLOCK_M rows, R_PAD ``rp`` and dY of ``itemsize`` bytes: its stages cut to what
    fits shared memory, counting per stage dY's (BLOCK_M, BLOCK_N) tile and twice B's (BLOCK_N, R_PAD) one (u's
    rows and the layout copies). Compiled for sm_90 (triton 3.6, fp32 with TF32, R_PAD 256), 3 stages take
    245760 B, which does not launch; bf16 fits at every R_PAD up to 256 with its 3 stages."""
    bn = _PINNED_DY_PASS["BLOCK_N"]
    return dict(_PINNED_DY_PASS, num_stages=fit_stages(bn * (block_m + 2 * rp) * itemsize,
                                                       _PINNED_DY_PASS["num_stages"]))
# Every column chunk is a multiple of this (the largest BLOCK_N of the configs), so no config straddles one.
_DY_PASS_N_ALIGN = 128


def dy_pass_block_m(M: int, rp: int) -> int:
    """Rows a dY-pass program owns on a GPU: 256 up to R_PAD 32, then 8192 / R_PAD (the fp32 v accumulator
    at 32 KiB), at most M rounded up to a power of two (16 at least, tl.dot's smallest dimension)."""
    return max(16, min(256, 8192 // rp, triton.next_power_of_2(max(int(M), 1))))


def dy_pass_split(t: torch.Tensor, rows: int, N: int, block_n: int) -> int:
    """How many column chunks the dY pass cuts N into (each a partial of v, M x R fp32): under explicit
    blocks ``split_count``'s rule (2 past two blocks, so the interpreter runs the split); on a GPU one
    program per SM (not two as the shrink: every further chunk adds M x R x 8 bytes of partial traffic, and
    a program streaming 2-3 stages of 32 KiB tiles keeps enough bytes in flight; not yet timed), each
    chunk at least 4 blocks, at most 64."""
    if _use_explicit_blocks(t):
        return split_count(t, rows, N, block_n)
    return max(1, min(triton.cdiv(_sm_count(t.device.index or 0), max(int(rows), 1)), triton.cdiv(N, 4 * block_n),
                      64))

# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


def lora_shrink(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, seed: int = 0, threshold: int = 0,
                mask_sp: int = 0, mask_sq: int = 0) -> torch.Tensor:
    """fp32 ``scale * drop(a) @ b``: a (P, Q) any strides, b (Q, R) any strides -> (P, R) fp32.

    Element (p, q) of ``a`` is dropped when ``threshold > 0`` and
    ``draw(seed, p * mask_sp + q * mask_sq) < threshold`` (the defaults: no dropout).
    """
    P, Q = a.shape
    R = b.shape[1]
    if _use_explicit_blocks(a):
        block_p, block_q, warps, stages = _TEST_BLOCKS["BLOCK_P"], _TEST_BLOCKS["BLOCK_Q"], 4, 1
    else:
        # BLOCK_P=64/BLOCK_Q=64, 3 stages: a narrow-output GEMM is bound by reading a; not yet tuned on a card.
        # Fewer stages where the tiles would not fit shared memory (fp32 from R_PAD 256).
        block_p, warps = 64, 4
        block_q, stages = narrow_blocks(block_p, r_pad(R), a.element_size(), b.element_size())
    q_per_split, split = split_chunk(Q, split_count(a, triton.cdiv(P, block_p), Q, block_q), block_q)
    out = torch.empty((split, P, R), device=a.device, dtype=torch.float32)
    if P == 0 or R == 0:
        return out.sum(0)
    if Q == 0:
        return out.zero_().sum(0)
    grid = (triton.cdiv(P, block_p), split)
    _wrap(_lora_shrink_kernel)[grid](
        a, b, out, P, Q, R, q_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        seed, threshold, mask_sp, mask_sq, scale,
        HAS_MASK=threshold > 0, BLOCK_P=block_p, BLOCK_Q=block_q, R_PAD=r_pad(R),
        DOT_PRECISION=_dot_precision(a.dtype), UPCAST=_upcast(a.dtype), num_warps=warps, num_stages=stages,
    )
    # Partials are added in a fixed order: deterministic, no atomics.
    return out[0] if split == 1 else out.sum(0)


def lora_gemm(a: torch.Tensor, b: torch.Tensor, lu: torch.Tensor, lv: torch.Tensor,
              bias: torch.Tensor | None = None, scale: float = 1.0, seed: int = 0, threshold: int = 0) -> torch.Tensor:
    """``a @ b + scale * mask * (lu @ lv) + bias`` in a's dtype, one kernel.

    a (M, K), b (K, N), lu (M, R) (fp32 or a's dtype), lv (R, N), bias (N,) or None; any strides.
    The mask of (m, n) is ``draw(seed, m * N + n) >= threshold`` (none when threshold == 0, the default).
    """
    M, K = a.shape
    N = b.shape[1]
    R = lu.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return out
    lv, scale = scale_onto_lv(lv, scale)
    args = (a, b, lu, lv, bias if bias is not None else out, out, M, N, K, R, triton.next_power_of_2(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), lu.stride(0), lu.stride(1),
            lv.stride(0), lv.stride(1), out.stride(0), out.stride(1), scale, seed, threshold)
    meta = dict(HAS_BIAS=bias is not None, HAS_MASK=threshold > 0, R_PAD=r_pad(R),
                DOT_PRECISION=_dot_precision(a.dtype), UPCAST=_upcast(a.dtype))
    cfg = gemm_launch_config(a, _TEST_BLOCKS)
    if cfg is not None:
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _wrap(_lora_gemm_kernel)[grid](*args, **meta, **cfg)
    else:
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
        _wrap(_lora_gemm_tuned)[grid](*args, **meta)
    return out


def lora_lowrank_add_(out: torch.Tensor, lu: torch.Tensor, lv: torch.Tensor, scale: float = 1.0, seed: int = 0,
                      threshold: int = 0) -> torch.Tensor:
    """In place ``out += scale * mask * (lu @ lv)``: out (M, N), lu (M, R), lv (R, N); returns out. The
    mask of (m, n) is ``draw(seed, m * N + n) >= threshold`` (none when threshold == 0, the default)."""
    M, N = out.shape
    R = lu.shape[1]
    if M == 0 or N == 0:
        return out
    bm, bn = (_TEST_BLOCKS["BLOCK_M"], _TEST_BLOCKS["BLOCK_N"]) if _use_explicit_blocks(out) else (64, 128)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _wrap(_lora_lowrank_add_kernel)[grid](
        out, lu, lv, M, N, R, out.stride(0), out.stride(1), lu.stride(0), lu.stride(1), lv.stride(0),
        lv.stride(1), scale, seed, threshold,
        HAS_MASK=threshold > 0, BLOCK_M=bm, BLOCK_N=bn, R_PAD=r_pad(R), DOT_PRECISION=_dot_precision(out.dtype),
        UPCAST=_upcast(out.dtype), num_warps=4, num_stages=1,
    )
    return out


def lora_dy_pass(dy: torch.Tensor, b: torch.Tensor, u: torch.Tensor, scale: float = 1.0) -> tuple:
    """``(v, dB)`` from one read of dY: v = dy @ b (M, R) fp32 and dB = scale * dy^T @ u (N, R) fp32.

    dy (M, N), b (N, R), u (M, R) (fp32 or dy's dtype, rounded to dy's dtype as the shrink does); any
    strides. dY is cut into row blocks x column chunks; v's partials (one per column chunk) and dB's (one
    per row block) are added in a fixed order (deterministic, no atomics). Partial bytes: (split * M +
    cdiv(M, BLOCK_M) * N) * R * 4, e.g. 11 MB at M=8192, N=4096, r=16 on 132 SMs (BLOCK_M 256, 5 chunks)
    beside the 67 MB of dY.
    """
    M, N = dy.shape
    R = b.shape[1]
    if b.shape[0] != N or u.shape != (M, R):
        raise ValueError(f"lora_dy_pass: dy {tuple(dy.shape)}, b {tuple(b.shape)}, u {tuple(u.shape)}: want "
                         "dy (M, N), b (N, R), u (M, R)")
    if M == 0 or N == 0 or R == 0:
        return (torch.zeros((M, R), device=dy.device, dtype=torch.float32),
                torch.zeros((N, R), device=dy.device, dtype=torch.float32))
    rp = r_pad(R)
    cfg = None
    if _use_explicit_blocks(dy):
        block_m, block_n = _TEST_BLOCKS["BLOCK_M"], _TEST_BLOCKS["BLOCK_N"]
        cfg = {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    else:
        block_m, block_n = dy_pass_block_m(M, rp), _DY_PASS_N_ALIGN
        if is_deterministic():
            cfg = pinned_dy_pass(block_m, rp, dy.element_size())
    rows = triton.cdiv(M, block_m)
    n_per_split, split = split_chunk(N, dy_pass_split(dy, rows, N, block_n), block_n)
    v = torch.empty((split, M, R), device=dy.device, dtype=torch.float32)
    db = torch.empty((rows, N, R), device=dy.device, dtype=torch.float32)
    args = (dy, b, u, v, db, M, N, R, n_per_split, triton.next_power_of_2(M),
            dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), u.stride(0), u.stride(1),
            v.stride(0), v.stride(1), v.stride(2), db.stride(0), db.stride(1), db.stride(2), scale)
    meta = dict(BLOCK_M=block_m, R_PAD=rp, DOT_PRECISION=_dot_precision(dy.dtype), UPCAST=_upcast(dy.dtype))
    grid = (rows, split)
    if cfg is not None:
        _wrap(_lora_dy_pass_kernel)[grid](*args, **meta, **cfg)
    else:
        _wrap(_lora_dy_pass_tuned)[grid](*args, **meta)
    # Partials are added in a fixed order: deterministic, no atomics.
    return (v[0] if split == 1 else v.sum(0)), (db[0] if rows == 1 else db.sum(0))

# ----------------------------------------------------------------------------------------------------
# torch.library registration: torch.compile(fullgraph=True) traces these ops and the kernels inside.
# ----------------------------------------------------------------------------------------------------

# The plumbing (eager calls go straight to the launchers, torch.compile traces the ops; a seed drawn inside a
# compiled region reaches the kernels as ``seed_t``) is in _common.py.

if _HAS_TRITON_OP:
    @_library_op("fastpeft::lora_shrink", mutates_args=())
    def _lora_shrink_op(a: torch.Tensor, b: torch.Tensor, scale: float, seed: int, threshold: int, mask_sp: int,
                        mask_sq: int, seed_t: torch.Tensor | None = None) -> torch.Tensor:
        with _op_body():
            return lora_shrink(a, b, scale, _seed(seed, seed_t), threshold, mask_sp, mask_sq)

    @_library_op("fastpeft::lora_gemm", mutates_args=())
    def _lora_gemm_op(a: torch.Tensor, b: torch.Tensor, lu: torch.Tensor, lv: torch.Tensor,
                      bias: torch.Tensor | None, scale: float, seed: int, threshold: int,
                      seed_t: torch.Tensor | None = None) -> torch.Tensor:
        with _op_body():
            return lora_gemm(a, b, lu, lv, bias, scale, _seed(seed, seed_t), threshold)

    @_library_op("fastpeft::lora_lowrank_add_", mutates_args=("out",))
    def _lora_lowrank_add_op(out: torch.Tensor, lu: torch.Tensor, lv: torch.Tensor, scale: float, seed: int,
                             threshold: int, seed_t: torch.Tensor | None = None) -> None:
        with _op_body():
            lora_lowrank_add_(out, lu, lv, scale, _seed(seed, seed_t), threshold)

    # On GPUs triton_op derives the fake (meta) implementations by tracing the launchers, whose kernel
    # launches become no-ops on fake tensors. Under TRITON_INTERPRET the kernels are plain Python
    # functions that would run on them, so there the fakes are given explicitly (shapes only).
    if INTERPRET:
        @_lora_shrink_op.register_fake
        def _(a, b, scale, seed, threshold, mask_sp, mask_sq, seed_t=None):
            return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)

        @_lora_gemm_op.register_fake
        def _(a, b, lu, lv, bias, scale, seed, threshold, seed_t=None):
            return a.new_empty((a.shape[0], b.shape[1]))

        @_lora_lowrank_add_op.register_fake
        def _(out, lu, lv, scale, seed, threshold, seed_t=None):
            return None

    def _lowrank_add_registered(out, lu, lv, scale, seed, threshold, seed_t=None):
        torch.ops.fastpeft.lora_lowrank_add_(out, lu, lv, scale, seed, threshold, seed_t=seed_t)
        return out

    shrink_op = eager_or_op(lora_shrink, torch.ops.fastpeft.lora_shrink)
    gemm_op = eager_or_op(lora_gemm, torch.ops.fastpeft.lora_gemm)
    lowrank_add_op = eager_or_op(lora_lowrank_add_, _lowrank_add_registered)
else:  # torch < 2.6: plain launchers (eager only)
    shrink_op, gemm_op, lowrank_add_op = lora_shrink, lora_gemm, lora_lowrank_add_


# The dY pass, registered apart from the ops above (its own block: an addition, not a change to theirs).
if _HAS_TRITON_OP:
    @_library_op("fastpeft::lora_dy_pass", mutates_args=())
    def _lora_dy_pass_op(dy: torch.Tensor, b: torch.Tensor, u: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        with _op_body():
            return lora_dy_pass(dy, b, u, scale)

    if INTERPRET:
        @_lora_dy_pass_op.register_fake
        def _(dy, b, u, scale):
            return (dy.new_empty((dy.shape[0], b.shape[1]), dtype=torch.float32),
                    dy.new_empty((dy.shape[1], b.shape[1]), dtype=torch.float32))

    dy_pass_op = eager_or_op(lora_dy_pass, torch.ops.fastpeft.lora_dy_pass)
else:  # torch < 2.6: the plain launcher (eager only)
    dy_pass_op = lora_dy_pass

# ----------------------------------------------------------------------------------------------------
# the timed choice: the fastest of N named candidates, measured once per shape key
# ----------------------------------------------------------------------------------------------------

# FASTPEFT_LORA_GEMM: "fused" (the epilogue GEMM), "tma" (kernels/lora_tma.py, sm_90+), "cublas" (cuBLAS +
# in-place low-rank update) force the GEMM of the kernel path; "torch" forces the plain torch composition of
# the whole LoRA forward / backward (fastpeft/ops/lora.py); "tma-shrink" the LoRA forward with the shrink
# fused into the TMA GEMM (lora_tma.lora_forward_tma; other GEMMs: TMA); "decode" the LoRA forward in one
# launch of quant.lora_decode (other GEMMs: the fused one); "auto" times what can run.
GEMM_CHOICES = ("auto", "fused", "tma", "cublas", "torch", "tma-shrink", "decode")
_choice_cache: dict = {}


def env_choice(var: str, choices: tuple) -> str:
    """The value of environment variable ``var`` (default: the first choice), checked against ``choices``."""
    raw = getenv(var)  # read at every call: a change takes effect at once
    mode = choices[0] if raw is None else raw.lower()
    if mode not in choices:
        raise ValueError(f"{var} must be one of {choices}, got {mode!r}")
    return mode


def gemm_mode() -> str:
    return env_choice("FASTPEFT_LORA_GEMM", GEMM_CHOICES)


def _bench(fn) -> float:
    """Median ms of ``fn`` (``triton.testing.do_bench``); tests replace it with a fake clock."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")  # do_bench's default is the mean


def _cannot_run_errors() -> tuple:
    """The exceptions by which a candidate says it cannot run on this card rather than that it is wrong:
    triton's compile and launch-resource errors (a config over the card's shared memory or registers, a
    construct its compiler rejects, an autotune list its prune leaves empty), raised before anything runs."""
    from triton.compiler import errors as ce
    from triton.runtime import errors as re_

    names = ((re_, "OutOfResources"), (re_, "PTXASError"), (re_, "AutotunerError"), (ce, "CompilationError"))
    return tuple(getattr(m, n) for m, n in names if hasattr(m, n))


def timed_choice(cache: dict, key: tuple, mode: str, device: torch.device, candidates: dict, fixed: str) -> str:
    """The name of the candidate to run for this shape key, given the environment's ``mode``.

    ``candidates`` maps names to zero-argument callables running that variant; the caller offers only
    those that can run on these tensors. The first is the kernel path: off CUDA and under the interpreter
    ``auto`` runs it (so that it is tested). A forced ``mode`` wins (ValueError when it is not offered).
    On CUDA every candidate is run once (autotuning is not timed as its run), then timed (``_bench``:
    ``do_bench`` median) and the fastest is kept in ``cache``. Deterministic mode
    (``fastpeft.set_deterministic``, ``torch.use_deterministic_algorithms(True)``) and torch.compile tracing
    take ``fixed`` without timing: a timing-dependent choice could change the bits between runs. Tracing
    takes it even where eager calls have timed the key: a compiled graph does not depend on what this
    process measured before, and dynamo never reads (and guards on) the cache. A shape first met while a
    CUDA graph is captured takes ``fixed`` too (timing syncs, which capture forbids: warm up before capturing
    to have it timed). A measured winner that this call does not offer gives ``fixed``. A candidate whose first
    run raises one of triton's compile or resource errors (``_cannot_run_errors``) is left out of the timing,
    with a warning naming it and the error (the floor holds whatever a kernel's config does on a card); where
    every candidate raises, the first error propagates.
    """
    if mode != "auto":
        if mode not in candidates:
            raise ValueError(f"{mode!r} is forced but cannot run here; offered: {tuple(candidates)}")
        return mode
    first = next(iter(candidates))
    fixed = fixed if fixed in candidates else first
    name = settled_choice(cache, key, device, fixed, first)
    if name is not None:
        # A key's measured winner may not be offered to this call: a row count within the key's power of
        # two but below an offering threshold (the fused TMA paths' 256 rows in bucket 129-256), or an x
        # whose strides the TMA path refuses. Then the fixed choice, without re-timing the key.
        return name if name in candidates else fixed
    if len(candidates) == 1:
        return first
    failed = {}
    for name, run in candidates.items():
        try:
            run()
        except _cannot_run_errors() as e:
            failed[name] = e
    if len(failed) == len(candidates):
        raise next(iter(failed.values()))
    if failed:
        warnings.warn("fastpeft: " + "; ".join(f"{name!r} cannot run here ({type(e).__name__}: "
                                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                                               for name, e in failed.items())
                      + f"; shape key {key} runs the fastest of {tuple(n for n in candidates if n not in failed)}",
                      RuntimeWarning, stacklevel=2)
    times = {name: _bench(run) for name, run in candidates.items() if name not in failed}
    cache[key] = min(times, key=times.get)  # ties keep the earlier (the kernel path)
    return cache[key]


def settled_choice(cache: dict, key: tuple, device: torch.device, fixed: str, first: str) -> str | None:
    """``timed_choice``'s answer in ``auto`` mode where no candidate has to run, else None (a key to time):
    ``first`` off CUDA and under the interpreter, ``fixed`` in deterministic mode and while tracing, the
    measured one for a measured key. Callers that know it before building their candidates (``fixed``
    and ``first`` both offered) skip building them. Deterministic mode and the cache are read at every call,
    so a change of either takes effect at once."""
    if device.type != "cuda" or INTERPRET:
        return first
    if is_deterministic() or torch.compiler.is_compiling():
        # Tracing takes ``fixed`` even for a key eager calls have timed: a compiled graph must not depend
        # on what this process measured before, and dynamo must not read (and guard on) the cache.
        return fixed
    hit = cache.get(key)
    if hit is None and capturing():
        return fixed  # nothing to time while a CUDA graph is captured (timing syncs, which capture forbids)
    return hit


def _gemm_choice_mode() -> str:
    mode = gemm_mode()
    # "torch" forces the torch composition, whose GEMM is cuBLAS; "tma-shrink" the TMA GEMM with the shrink.
    return {"torch": "cublas", "tma-shrink": "tma", "decode": "fused"}.get(mode, mode)


def choose_gemm(key: tuple, candidates: dict, device: torch.device) -> str:
    """One of ``"fused"``, ``"tma"``, ``"cublas"`` (those offered) for this shape key; FASTPEFT_LORA_GEMM
    forces one ("torch" forces the whole torch composition, whose GEMM is cuBLAS). Deterministic: cuBLAS."""
    return timed_choice(_choice_cache, key, _gemm_choice_mode(), device, candidates, "cublas")


def settled_gemm(key: tuple, device: torch.device) -> str | None:
    """``choose_gemm``'s answer where it needs no candidates (the fused GEMM and cuBLAS, always offered): a
    forced ``fused`` / ``cublas`` / ``torch``, or ``settled_choice``. None where it needs them: a forced TMA
    (not every shape and card offers it) or a shape to time."""
    mode = _gemm_choice_mode()
    if mode == "auto":
        return settled_choice(_choice_cache, key, device, "cublas", "fused")
    return None if mode == "tma" else mode
