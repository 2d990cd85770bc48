"""Sparse-delta kernels: ``y = x (W + Δ)^T + b`` without a W-sized tensor kept for backward, and the
gradient of Δ's values without an (out, in) gradient.

Δ is ``nnz`` flat entries (block_size 1: row-major indices into W (out, in)) or ``nblocks`` b x b blocks
(indices (nblocks, 2) of block (row, col); blocks on the bottom / right edge are clipped to W).

Forward and dX, two ways (picked per shape by ``choose_sparse_gemm``, as ``lora.choose_gemm`` picks
its GEMM):

- *dense*: ``_densify_flat_kernel`` / ``_densify_block_kernel`` write ``W' = W + Δ`` into a fresh copy
  of W (one rounding of the fp32 sum, in x's dtype), a cuBLAS matmul (or the LoRA kernels) uses it and
  it is freed at once; backward recomputes it. Transient memory: one W.
- *fused* (blocks, b >= 16 a power of two): ``_sparse_gemm_kernel`` adds Δ into its W tile loads,
  guided by a (cdiv(out, b), cdiv(in, b)) int32 block map (block id, or -1). Its K step never crosses a
  block column (BLOCK_K <= b), so a tile's blocks are found with one (BLOCK_N,) gather of the map per
  step. The same kernel computes the forward ``x (W+Δ)^T`` and dX ``dY (W+Δ)`` (strides swap W, the map
  and the blocks), with the optional LoRA epilogue ``+ s mask * (lu @ lv)`` and bias of
  ``lora._lora_gemm_kernel``. No W-sized memory at all.

Gradient of the values (an SDDMM: ``dΔ = (dY^T X)`` sampled on Δ's support, reduced over the M rows):

- ``_sddmm_block_kernel``: one program per block (per b x b sub-tile of at most 64 x 64), ``dY[:, rows]^T
  X[:, cols]`` with tl.dot over M; the M range may be split into partial sums added in a fixed order.
- ``_sddmm_tile_kernel`` (block_size 1): the entries are bucketed once by T x T tile of W (T = 32 or
  64; ``fastpeft.ops.sparse.TilePlan``). A persistent grid walks the non-empty tiles; each program forms
  the T x T product ``dY[:, tile rows]^T X[:, tile cols]`` over M with tl.dot in registers, stores it to
  its own small fp32 scratch slot (a few MiB over the grid: it stays in L2), and after a
  ``tl.debug_barrier()`` gathers the tile's entries from it. Why a scratch and not a one-hot matmul:
  extracting E entries with one-hot matrices costs E x T x T more MMA work per tile and, in tf32, would
  round the fp32 products; the scratch read is exact and touches only T^2 * 4 bytes of L2.
- ``_gather_dot_kernel``: for very low densities, each entry is a dot product of two columns over M
  (CUDA cores, no tile waste). Dispatch rule in ``choose_sddmm``.

No atomics: every partial sum is added in a fixed order, so the same inputs give the same bits.

On sm_90+ a third way (``sparse_block_gemm_tma``): a @ op(W) on lora_tma's persistent TMA GEMM, and in each
output tile one more MMA per Δ block in its columns (a's b columns times the block, placed in a (b, BLOCK_N)
operand), from a CSR of the blocks by output block (``block_csr``). W + Δ is never formed.

This module imports only torch, triton and its siblings ``_common``, ``lora`` (the LoRA epilogue, the GEMM
configs and the timed choice) and ``lora_tma`` (the TMA GEMM's K loop and epilogue).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET
from . import lora_tma as _T
from ._common import (_HAS_TRITON_OP, _cast, _dot_precision, _grouped_coords, _grouped_tile, _keep_mask_tile,
                      _library_op, _mma, _op_body, _seed, _sm_count, _tile_ranges, _upcast, _use_explicit_blocks, _wrap,
                      block_setter, eager_or_op, r_pad, scale_onto_lv, split_chunk, split_count)
from .lora import _GEMM_CONFIGS, _prune_gemm_configs, env_choice, gemm_launch_config, timed_choice
from .lora_tma import _gemm_descs, _k_loop, _tma_lowrank_epilogue, _tma_store_part

# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _densify_flat_kernel(
    # pointers: w (out, in) read; dst (out, in) holds W already (in its dtype) and gets W + Δ at the entries
    w_ptr, dst_ptr, idx_ptr, val_ptr,
    # sizes
    nnz, in_features,
    # strides
    stride_wr, stride_wc, stride_dr, stride_dc, stride_i, stride_v,
    # meta-parameters
    BLOCK: tl.constexpr, UPCAST: tl.constexpr,
):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < nnz
    flat = tl.load(idx_ptr + e.to(tl.int64) * stride_i, mask=ok, other=0).to(tl.int64)
    r = flat // in_features
    c = flat % in_features
    # W is read from the source, not from dst: with dst in a lower precision the sum is rounded once.
    w = tl.load(w_ptr + r * stride_wr + c * stride_wc, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(val_ptr + e.to(tl.int64) * stride_v, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst_ptr + r * stride_dr + c * stride_dc, _cast(w + v, dst_ptr.dtype.element_ty, UPCAST), mask=ok)


@triton.jit
def _block_sub_tile(idx_ptr, b, NSUB, stride_ib, stride_ic, SUB: tl.constexpr):
    """``(blk, lr, lc, rows, cols)`` of this program's (SUB, SUB) sub-tile of a delta block: block ``blk`` =
    program id 0, sub-tile (si, sj) = divmod(program id 1, NSUB); lr / lc its rows / columns inside the
    (b, b) block, rows / cols the same in W (from the block's (row, col) in idx)."""
    blk = tl.program_id(0)
    si = tl.program_id(1) // NSUB
    sj = tl.program_id(1) % NSUB
    br = tl.load(idx_ptr + blk.to(tl.int64) * stride_ib).to(tl.int64)
    bc = tl.load(idx_ptr + blk.to(tl.int64) * stride_ib + stride_ic).to(tl.int64)
    lr = si * SUB + tl.arange(0, SUB)
    lc = sj * SUB + tl.arange(0, SUB)
    return blk, lr, lc, br * b + lr, bc * b + lc


@triton.jit
def _densify_block_kernel(
    # pointers: as _densify_flat_kernel; idx (nblocks, 2) block (row, col); val (nblocks, b, b)
    w_ptr, dst_ptr, idx_ptr, val_ptr,
    # sizes (NSUB: sub-tiles per block side)
    out_features, in_features, b, NSUB,
    # strides
    stride_wr, stride_wc, stride_dr, stride_dc, stride_ib, stride_ic, stride_vb, stride_vr, stride_vc,
    # meta-parameters
    SUB: tl.constexpr, UPCAST: tl.constexpr,
):
    blk, lr, lc, rows, cols = _block_sub_tile(idx_ptr, b, NSUB, stride_ib, stride_ic, SUB)
    # Clipped edge blocks: the part outside W is neither read nor written.
    ok = ((lr < b) & (rows < out_features))[:, None] & ((lc < b) & (cols < in_features))[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wr + cols[None, :] * stride_wc, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(val_ptr + blk.to(tl.int64) * stride_vb + lr[:, None] * stride_vr + lc[None, :] * stride_vc, mask=ok,
                other=0.0).to(tl.float32)
    tl.store(dst_ptr + rows[:, None] * stride_dr + cols[None, :] * stride_dc,
             _cast(w + v, dst_ptr.dtype.element_ty, UPCAST), mask=ok)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _sparse_gemm_kernel(
    # pointers: a (M, K); w: W viewed as the (K, N) right operand; bmap: the block map viewed as
    # (cdiv(K, DB), cdiv(N, DB)) of block ids (-1: none); val (nblocks, DB, DB) viewed per block as (k, n);
    # lu (M, R), lv (R, N) low-rank term; bias (N,); out (M, N)
    a_ptr, w_ptr, bmap_ptr, val_ptr, lu_ptr, lv_ptr, bias_ptr, out_ptr,
    # sizes (M_KEY: M rounded up to a power of two, only an autotuning key)
    M, N, K, R, M_KEY,
    # strides
    stride_am, stride_ak, stride_wk, stride_wn, stride_mk, stride_mn, stride_vb, stride_vk, stride_vn,
    stride_lum, stride_lur, stride_lvr, stride_lvn, stride_om, stride_on,
    # low-rank term: scale * mask * (lu @ lv), mask of (m, n) from draw(seed, m * N + n) >= threshold
    scale, seed, threshold,
    # meta-parameters (DB: the delta's block size; BLOCK_K <= DB, both powers of two)
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_MASK: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # out = a @ (W + Δ) [+ scale * mask * (lu @ lv)] [+ bias], with W + Δ formed tile by tile in registers.
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn, rk, m_ok, n_ok = _tile_ranges(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    blk_n = (rn // DB).to(tl.int64) * stride_mn     # block coordinate of each output column, as a map offset
    in_n = (rn % DB).to(tl.int64) * stride_vn       # column inside its block
    # The accumulator is out^T: the W + Δ tile, built in registers, is the left MMA operand (Hopper's
    # wgmma takes its A operand from registers; B, the tile of a, then streams through shared memory as
    # loaded). Reasoning from the ISA, not measured.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        at = tl.load(a_ptr + rm[None, :].to(tl.int64) * stride_am + kk[:, None].to(tl.int64) * stride_ak,
                     mask=k_ok[:, None] & m_ok[None, :], other=0.0)                       # (BLOCK_K, BLOCK_M)
        wt = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :].to(tl.int64) * stride_wk,
                     mask=n_ok[:, None] & k_ok[None, :], other=0.0)                       # (BLOCK_N, BLOCK_K)
        # BLOCK_K <= DB: this K step lies in one block column, so one id per output column.
        bid = tl.load(bmap_ptr + (k0 // DB) * stride_mk + blk_n, mask=n_ok, other=-1)
        has = bid >= 0
        d = tl.load(val_ptr + bid.to(tl.int64)[:, None] * stride_vb + in_n[:, None]
                    + (kk % DB).to(tl.int64)[None, :] * stride_vk,
                    mask=(has & n_ok)[:, None] & k_ok[None, :], other=0.0)
        # fp32 sum, one rounding to a's dtype: the same numbers as the densified W + Δ.
        wt = _cast(wt.to(tl.float32) + d.to(tl.float32), at.dtype, UPCAST)
        acc = _mma(wt, at, acc, DOT_PRECISION, UPCAST)

    if HAS_LOWRANK:
        # The rank-R update out^T += (lv^T) (scale * lu)^T: s folded into lu (rounded once to lv's dtype), one
        # more MMA into the accumulator without the mask; with it, formed apart and masked, one Philox draw
        # per 4 columns (_common._keep_mask_tile). The old second fp32 tile plus per-element draws spilled on
        # sm_90 (triton 3.9): 256-848 B for the big configs.
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        lut = tl.load(lu_ptr + rm[None, :].to(tl.int64) * stride_lum + rr[:, None] * stride_lur,
                      mask=r_ok[:, None] & m_ok[None, :], other=0.0)                     # (R_PAD, BLOCK_M)
        lvt = tl.load(lv_ptr + rn[:, None].to(tl.int64) * stride_lvn + rr[None, :] * stride_lvr,
                      mask=n_ok[:, None] & r_ok[None, :], other=0.0)                     # (BLOCK_N, R_PAD)
        lut = _cast(lut.to(tl.float32) * scale, lvt.dtype, UPCAST)
        if HAS_MASK:
            low = _mma(lvt, lut, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_PRECISION, UPCAST)
            n0 = pid_n * BLOCK_N
            if N % 4 == 0:
                keep = _keep_mask_tile(seed, rm, n0, N, threshold, BLOCK_M, BLOCK_N, True)
            else:
                keep = _keep_mask_tile(seed, rm, n0, N, threshold, BLOCK_M, BLOCK_N, False)
            acc += tl.where(tl.trans(keep), low, 0.0)
        else:
            acc = _mma(lvt, lut, acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + rm[None, :].to(tl.int64) * stride_om + rn[:, None].to(tl.int64) * stride_on
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _sddmm_block_kernel(
    # pointers: dy (M, N); x (M, K); idx (nblocks, 2) block (row, col); out (S, nblocks, b, b) fp32
    dy_ptr, x_ptr, idx_ptr, out_ptr,
    # sizes (NSUB: sub-tiles per block side; each split s reduces rows [s * m_per_split, ...))
    M, N, K, b, NSUB, m_per_split,
    # strides
    stride_dm, stride_dn, stride_xm, stride_xk, stride_ib, stride_ic, stride_os, stride_ob, stride_or, stride_oc,
    # meta-parameters
    SUB: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    blk, lr, lc, rows, cols = _block_sub_tile(idx_ptr, b, NSUB, stride_ib, stride_ic, SUB)
    pid_s = tl.program_id(2)
    # Values outside W (clipped edge blocks) never reach y: their gradient is an exact 0.
    r_ok = (lr < b) & (rows < N)
    c_ok = (lc < b) & (cols < K)
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((SUB, SUB), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_hi
        g = tl.load(dy_ptr + rm[None, :].to(tl.int64) * stride_dm + rows[:, None] * stride_dn,
                    mask=r_ok[:, None] & m_ok[None, :], other=0.0)                # (SUB, BLOCK_M) = dY^T
        xx = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk,
                     mask=m_ok[:, None] & c_ok[None, :], other=0.0)               # (BLOCK_M, SUB)
        acc = _mma(g, xx, acc, DOT_PRECISION, UPCAST)
    out = (out_ptr + pid_s.to(tl.int64) * stride_os + blk.to(tl.int64) * stride_ob
           + lr[:, None].to(tl.int64) * stride_or + lc[None, :].to(tl.int64) * stride_oc)
    tl.store(out, acc, mask=(lr < b)[:, None] & (lc < b)[None, :])


@triton.jit
def _sddmm_tile_kernel(
    # pointers: dy (M, N); x (M, K); tiles: the tile ids to visit (non-empty first, in a grouped order);
    # count (1,): how many are non-empty; starts (ntiles + 1,): segment of each tile in the tile-sorted
    # entries; order (nnz,): sorted position -> entry; loc (nnz,): the entry's offset in its tile
    # (row * T + col); scratch (G * S, T * T) fp32, one slot per program; out (S, nnz) fp32
    dy_ptr, x_ptr, tiles_ptr, count_ptr, starts_ptr, order_ptr, loc_ptr, scratch_ptr, out_ptr,
    # sizes (n_tc: tiles per row of W; each split s reduces rows [s * m_per_split, ...))
    M, N, K, n_tc, m_per_split,
    # strides
    stride_dm, stride_dn, stride_xm, stride_xk, stride_os,
    # meta-parameters
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    grid = tl.num_programs(0)
    slot = scratch_ptr + (pid_s * grid + pid).to(tl.int64) * (T * T)
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    rt = tl.arange(0, T)
    rt2 = rt[:, None] * T + rt[None, :]
    count = tl.load(count_ptr)
    # Persistent: program pid takes tiles pid, pid + grid, ... of the non-empty ones; no host sync needed
    # to know how many there are.
    for i in range(pid, count, grid):
        tile = tl.load(tiles_ptr + i)
        tr = tile // n_tc
        tc = tile % n_tc
        rows = tr * T + rt
        cols = tc * T + rt
        r_ok = rows < N
        c_ok = cols < K
        acc = tl.zeros((T, T), dtype=tl.float32)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < m_hi
            g = tl.load(dy_ptr + rm[None, :].to(tl.int64) * stride_dm + rows[:, None].to(tl.int64) * stride_dn,
                        mask=r_ok[:, None] & m_ok[None, :], other=0.0)            # (T, BLOCK_M) = dY^T
            xx = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + cols[None, :].to(tl.int64) * stride_xk,
                         mask=m_ok[:, None] & c_ok[None, :], other=0.0)           # (BLOCK_M, T)
            acc = _mma(g, xx, acc, DOT_PRECISION, UPCAST)
        tl.store(slot + rt2, acc)
        tl.debug_barrier()  # the whole tile is in the slot before any thread reads it back
        lo = tl.load(starts_ptr + tile)
        hi = tl.load(starts_ptr + tile + 1)
        for e0 in range(lo, hi, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            e_ok = e < hi
            ent = tl.load(order_ptr + e, mask=e_ok, other=0).to(tl.int64)
            off = tl.load(loc_ptr + e, mask=e_ok, other=0)
            # .cg: read from L2, where the barrier made the slot's stores visible.
            v = tl.load(slot + off, mask=e_ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + ent, v, mask=e_ok)
        tl.debug_barrier()  # every read of the slot is done before the next tile overwrites it


@triton.jit
def _gather_dot_kernel(
    # pointers: dy (M, N); x (M, K); idx (nnz,) flat row-major indices into (N, K); out (S, nnz) fp32
    dy_ptr, x_ptr, idx_ptr, out_ptr,
    # sizes
    M, nnz, K, m_per_split,
    # strides
    stride_dm, stride_dn, stride_xm, stride_xk, stride_i, stride_os,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # out[s, e] = sum over this split's rows m of dy[m, row_e] * x[m, col_e], fp32 on the CUDA cores.
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    pid_s = tl.program_id(1)
    e_ok = e < nnz
    flat = tl.load(idx_ptr + e.to(tl.int64) * stride_i, mask=e_ok, other=0).to(tl.int64)
    r = flat // K
    c = flat % K
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        ok = (rm < m_hi)[:, None] & e_ok[None, :]
        g = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dm + r[None, :] * stride_dn, mask=ok, other=0.0)
        xx = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + c[None, :] * stride_xk, mask=ok, other=0.0)
        acc += tl.sum(g.to(tl.float32) * xx.to(tl.float32), axis=0)
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + e, acc, mask=e_ok)


# ----------------------------------------------------------------------------------------------------
# block sizes
# ----------------------------------------------------------------------------------------------------

# Explicit blocks for the interpreter and for FASTPEFT_AUTOTUNE=0 (overridable with set_test_blocks):
# small, so that the odd test shapes cross block edges everywhere. BLOCK_M/N/K, GROUP_M: the fused GEMM
# (BLOCK_K capped at the delta's block size); SDDMM_M: rows per step of the three SDDMMs; BLOCK_E: entries
# per step of the tile SDDMM's gather and per program of the gather-dot; SCATTER: entries per program of
# the flat densify; SUB: largest sub-tile of a delta block per program; TILE_PROGRAMS: persistent
# programs of the tile SDDMM (few, so that each walks several tiles).
_TEST_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "SDDMM_M": 16, "BLOCK_E": 16,
                "SCATTER": 64, "SUB": 32, "TILE_PROGRAMS": 3}


set_test_blocks = block_setter(_TEST_BLOCKS)


def fused_gemm_ok(block_size: int) -> bool:
    """Whether the block-fused GEMM takes this block size: a power of two of at least 16 (tl.dot's
    smallest K, and a K step that never crosses a block column)."""
    b = int(block_size)
    return b >= 16 and (b & (b - 1)) == 0


def _sub_for(block_size: int, explicit: bool) -> int:
    """Side of the square sub-tile of a delta block that one program handles: the block padded to a power
    of two (at least 16, for tl.dot), at most 64 (a 64 x 64 fp32 accumulator stays in registers)."""
    cap = _TEST_BLOCKS["SUB"] if explicit else 64
    return min(max(16, triton.next_power_of_2(int(block_size))), max(16, cap))


# ----------------------------------------------------------------------------------------------------
# sm_90+: the TMA GEMM of lora_tma with Δ's blocks as more MMAs into each tile's accumulator
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "threshold"])
def _sparse_tma_kernel(
    # pointers: a (M, K) rows; b: W as (N, K) rows (B_NK, the forward) or (K, N) rows (dX); val (nblocks, DB, DB)
    # read per block as (k, n) by strides; ptr (cdiv(N, DB) + 1,) int32 and ent (nblocks, 2) int32: for each
    # block of DB output columns, its blocks' (block index along K, block id), CSR; lu (M, R), lv (R, N); bias
    # (N,); out (M, N) rows
    a_ptr, b_ptr, val_ptr, ptr_ptr, ent_ptr, lu_ptr, lv_ptr, bias_ptr, out_ptr,
    # sizes (M_KEY: M rounded up to a power of two, only an autotuning key)
    M, N, K, R, M_KEY,
    # strides (the inner stride of a, b and out is 1: TMA)
    stride_am, stride_b, stride_vb, stride_vk, stride_vn, stride_lum, stride_lur, stride_lvr, stride_lvn, stride_om,
    # low-rank term: scale * mask * (lu @ lv), mask of (m, n) from draw(seed, m * N + n) >= threshold
    scale, seed, threshold,
    # meta-parameters (DB: the delta's block side, 16..64; NUM_SMS: persistent programs)
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_MASK: tl.constexpr, B_NK: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, R_PAD: tl.constexpr,
    NUM_SMS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    SUB_N: tl.constexpr = BLOCK_N if (not HAS_MASK or BLOCK_N <= 64) else 64
    OBS: tl.constexpr = BLOCK_N // DB if BLOCK_N >= DB else 1  # blocks of output columns a tile spans
    a_desc, b_desc, out_desc, num_m, num_n, k_tiles = _gemm_descs(a_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_b,
                                                                  stride_om, B_NK, BLOCK_M, BLOCK_N, BLOCK_K, SUB_N)
    a_blk = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, DB])
    n_blocks = tl.cdiv(N, DB)
    kk = tl.arange(0, DB)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS):
        pid_m, pid_n = _grouped_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = _k_loop(a_desc, b_desc, off_m, off_n, k_tiles, K, val_ptr, B_NK, False, BLOCK_M, BLOCK_N, BLOCK_K,
                      DOT_PRECISION, UPCAST)
        # Δ's blocks in this tile's columns, each one more MMA: a's DB columns of the block (TMA, from L2 by
        # now) times the block placed at its columns of a (DB, BLOCK_N) operand, zero elsewhere.
        rn = off_n + tl.arange(0, BLOCK_N)
        for j in tl.static_range(OBS):
            ob = off_n // DB + j
            lo = tl.load(ptr_ptr + ob, mask=ob < n_blocks, other=0)
            hi = tl.load(ptr_ptr + ob + 1, mask=ob < n_blocks, other=0)
            nn = rn - ob * DB  # column inside block ob
            in_blk = (nn >= 0) & (nn < DB) & (rn < N)
            for e in range(lo, hi):
                kb = tl.load(ent_ptr + 2 * e)
                bid = tl.load(ent_ptr + 2 * e + 1).to(tl.int64)
                xs = a_blk.load([off_m, kb * DB])  # columns past K read as zeros
                d = tl.load(val_ptr + bid * stride_vb + kk[:, None] * stride_vk + nn[None, :] * stride_vn,
                            mask=(kb * DB + kk < K)[:, None] & in_blk[None, :], other=0.0)
                acc = _mma(xs, _cast(d.to(tl.float32), xs.dtype, UPCAST), acc, DOT_PRECISION, UPCAST)
        if HAS_LOWRANK:
            rm = off_m + tl.arange(0, BLOCK_M)
            rr = tl.arange(0, R_PAD)
            lu = tl.load(lu_ptr + rm[:, None].to(tl.int64) * stride_lum + rr[None, :] * stride_lur,
                         mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
            _tma_lowrank_epilogue(acc, lu, off_m, off_n, out_desc, out_ptr, lv_ptr, bias_ptr, val_ptr, M, N, R,
                                  stride_lvr, stride_lvn, scale, seed, threshold, HAS_BIAS, HAS_MASK, False, BLOCK_M,
                                  BLOCK_N, R_PAD, DOT_PRECISION, UPCAST)
        else:
            _tma_store_part(acc, acc, off_m, off_n, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr,
                            stride_lvn, seed, threshold, HAS_BIAS, False, BLOCK_M, BLOCK_N, R_PAD, DOT_PRECISION,
                            UPCAST)


def tma_gemm_ok(block_size: int) -> bool:
    """Whether the TMA sparse GEMM takes this block size: a power of two from 16 to 64 (a's DB columns and a
    (DB, BLOCK_N) operand per block beside the accumulator)."""
    return fused_gemm_ok(block_size) and int(block_size) <= 64


def _prune_sparse_tma_configs(configs, named_args, **kwargs):
    """lora_tma's rule for the plain TMA GEMM (with the LoRA epilogue's R_PAD and mask), 8 warps and BLOCK_K 64
    only, R_PAD up to 64 (RoSA's rank; ``tma_rank_fits``), BLOCK_N 128 at R_PAD 64 or blocks of 64: every config
    is one more compile in the card's first call (a forward, dX, and RoSA's two more), and the blocks'
    (b, BLOCK_N) operands sit beside the accumulator. Compiled for sm_90 (bf16, b 16 / 32 / 64, R_PAD 16): every
    config kept has no spill on triton 3.6 and 3.9; b 64 at BLOCK_N 256 takes 255 registers and spills 8-32 B
    on both, 4-warp ones spill with the mask (440-696 B on 3.9) and at b 64 (8-48 B on 3.6)."""
    r_pad_ = int(kwargs.get("R_PAD", named_args.get("R_PAD", 16)))
    has_mask = bool(kwargs.get("HAS_MASK", named_args.get("HAS_MASK", False)))
    db = int(kwargs.get("DB", named_args.get("DB", 32)))
    itemsize = _T._itemsize(named_args, "a_ptr")
    return [c for c in configs if _T._config_fits(c, has_mask, r_pad_, itemsize) and c.num_warps == 8 and r_pad_ <= 64
            and c.kwargs["BLOCK_K"] == 64 and ((r_pad_ < 64 and db < 64) or c.kwargs["BLOCK_N"] <= 128)]


def tma_rank_fits(rank: int) -> bool:
    """Whether the TMA sparse GEMM has configs for RoSA's LoRA rank (0: the delta alone): R_PAD <= 64."""
    return r_pad(max(int(rank), 1)) <= 64


@functools.lru_cache(maxsize=None)
def _sparse_tma_tuned():
    return triton.autotune(configs=_T._TMA_CONFIGS,
                           key=["M_KEY", "N", "K", "R_PAD", "HAS_MASK", "HAS_LOWRANK", "B_NK", "DB"],
                           prune_configs_by={"early_config_prune": _prune_sparse_tma_configs})(_sparse_tma_kernel)


def block_csr(block_indices: torch.Tensor, n_rows: int, n_cols: int, by_col: bool) -> tuple:
    """``(ptr, ent)`` of b x b blocks at ``block_indices`` (nblocks, 2) (block row, block col), for the TMA
    sparse GEMM: grouped by block row (the forward's output blocks) or by block column (``by_col``: dX's);
    ptr (groups + 1,) int32, ent (nblocks, 2) int32 = (the other block coordinate, block id), in order along
    it. Torch ops on the indices' device, no host sync."""
    idx = block_indices.long()
    major, minor = (idx[:, 1], idx[:, 0]) if by_col else (idx[:, 0], idx[:, 1])
    groups, other = (n_cols, n_rows) if by_col else (n_rows, n_cols)
    key = major * other + minor
    order = torch.argsort(key, stable=True)
    ptr = torch.searchsorted(major[order].contiguous(),
                             torch.arange(groups + 1, device=idx.device, dtype=major.dtype))
    ent = torch.stack([minor[order], order], dim=1)
    return ptr.to(torch.int32), ent.to(torch.int32).contiguous()


def sparse_block_gemm_tma(a: torch.Tensor, weight: torch.Tensor, csr: tuple, values: torch.Tensor,
                          lu: torch.Tensor | None, lv: torch.Tensor | None, bias: torch.Tensor | None, block_size: int,
                          transpose_w: bool, scale: float = 1.0, seed=0, threshold: int = 0,
                          config: dict | None = None) -> torch.Tensor:
    """``sparse_block_gemm`` on sm_90+: ``a @ op(W + Δ) [+ scale * mask * (lu @ lv)] [+ bias]`` in a's dtype as
    a @ op(W) (lora_tma's persistent TMA GEMM) plus, in each output tile, one MMA per Δ block in its columns
    (a's b columns of the block times the block, at b x BLOCK_N: the rest of that operand is zero), before
    the epilogue. W + Δ is never formed; Δ's products are added in fp32 to W's instead of W + Δ being rounded
    first (closer to the exact sum).

    ``csr``: ``block_csr`` of the block indices by block row (``transpose_w``, the forward: a (M, in) ->
    (M, out)) or by block column (dX: a (M, out) -> (M, in)); values (nblocks, b, b), b = ``block_size``
    (``tma_gemm_ok``). Other arguments as ``sparse_block_gemm``; ``config`` as ``lora_tma.lora_gemm_tma``.
    Needs ``lora_tma.tma_supported`` and TMA rows (in, out multiples of 16 bytes).
    """
    if not tma_gemm_ok(block_size):
        raise ValueError(f"sparse_block_gemm_tma: block_size must be 16, 32 or 64, got {block_size}")
    if not _T.tma_supported(a.device):
        raise RuntimeError(f"sparse_block_gemm_tma needs sm_90+ and triton with tl.make_tensor_descriptor "
                           f"(device {a.device}, triton {triton.__version__})")
    b_op = weight.t() if transpose_w else weight  # (K, N) view
    if not _T.tma_shapes_ok(a=a, b=b_op):
        raise ValueError(f"sparse_block_gemm_tma: K and N must be multiples of {16 // a.element_size()} for "
                         f"{a.dtype} (TMA rows of 16 bytes), got a {tuple(a.shape)}, W {tuple(weight.shape)}")
    M, K = a.shape
    N = b_op.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return out
    triton.set_allocator(_T._allocator(a.device))
    a = _T._with_rows(a)
    b_nk, b_arg = _T._b_operand(b_op)
    ptr, ent = csr
    # Δ's block (r, c) is values[id, r, c] with r along W's rows (out) and c along its columns (in).
    sv = (values.stride(2), values.stride(1)) if transpose_w else (values.stride(1), values.stride(2))
    has_low = lu is not None
    R = lu.shape[1] if has_low else 0
    if has_low:
        lv, scale = scale_onto_lv(lv, scale)
    args = (a, b_arg, values, ptr, ent, lu if has_low else out, lv if has_low else out,
            bias if bias is not None else out, out, M, N, K, R, triton.next_power_of_2(M),
            a.stride(0), b_arg.stride(0), values.stride(0), sv[0], sv[1],
            lu.stride(0) if has_low else 0, lu.stride(1) if has_low else 0,
            lv.stride(0) if has_low else 0, lv.stride(1) if has_low else 0, out.stride(0), scale, seed, threshold)
    meta = dict(HAS_BIAS=bias is not None, HAS_LOWRANK=has_low, HAS_MASK=has_low and threshold > 0, B_NK=b_nk,
                DB=int(block_size), R_PAD=r_pad(max(R, 1)), DOT_PRECISION=_dot_precision(a.dtype),
                UPCAST=_upcast(a.dtype))
    _T._run_persistent(_sparse_tma_kernel, _sparse_tma_tuned, a, M, N, args, meta, config)
    return out


# ----------------------------------------------------------------------------------------------------
# dispatch rules (block_size 1)
# ----------------------------------------------------------------------------------------------------

SDDMM_CHOICES = ("auto", "tile", "gather")


def sddmm_mode() -> str:
    return env_choice("FASTPEFT_SPARSE_SDDMM", SDDMM_CHOICES)


def choose_tile(nnz: int, out_features: int, in_features: int) -> int:
    """T of the tile SDDMM: 64 once a 64 x 64 tile holds 16 entries on average (density >= 0.4%), else 32.

    A T x T tile costs 2 T rows of reads per row of M for its entries: T = 64 halves the reads per
    output element but a sparse tile wastes more of its product. Cost model only, not measured on a GPU.
    """
    tiles64 = triton.cdiv(out_features, 64) * triton.cdiv(in_features, 64)
    return 64 if nnz >= 16 * tiles64 else 32


def choose_sddmm(nnz: int, out_features: int, in_features: int) -> str:
    """``"gather"`` or ``"tile"`` for the SDDMM of ``nnz`` flat entries (FASTPEFT_SPARSE_SDDMM forces one).

    Rule (a cost model, not measured on a GPU): per row of M, a non-empty 32 x 32 tile reads two 64-byte
    rows (bf16) with tensor cores doing the sums, while the gather-dot reads one or two 32-byte sectors
    per entry on the CUDA cores and wastes nothing on empty positions. With an L2-friendly tile order
    the tiles win as soon as they hold a few entries, so the gather-dot is kept for very low densities:
    fewer entries than a quarter of the number of 32 x 32 tiles (density < 0.025%, about 4k entries of a
    4096 x 4096 weight).
    """
    mode = sddmm_mode()
    if mode != "auto":
        return mode
    tiles32 = triton.cdiv(out_features, 32) * triton.cdiv(in_features, 32)
    return "gather" if 4 * nnz < tiles32 else "tile"


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


def sparse_densify(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, block_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """``W + Δ`` as a new contiguous (out, in) tensor of ``dtype`` (each entry rounded once from fp32).

    weight (out, in) any strides and dtype; block_size 1: indices (nnz,), values (nnz,); block_size b:
    indices (nblocks, 2), values (nblocks, b, b) (edge blocks clipped).
    """
    out_f, in_f = weight.shape
    dst = weight.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    nnz = indices.shape[0]
    if nnz == 0 or out_f == 0 or in_f == 0:
        return dst
    up = _upcast(dtype)
    if block_size == 1:
        block = _TEST_BLOCKS["SCATTER"] if _use_explicit_blocks(weight) else 1024
        _wrap(_densify_flat_kernel)[(triton.cdiv(nnz, block),)](
            weight, dst, indices, values, nnz, in_f,
            weight.stride(0), weight.stride(1), dst.stride(0), dst.stride(1), indices.stride(0), values.stride(0),
            BLOCK=block, UPCAST=up, num_warps=4,
        )
        return dst
    sub = _sub_for(block_size, _use_explicit_blocks(weight))
    nsub = triton.cdiv(block_size, sub)
    _wrap(_densify_block_kernel)[(nnz, nsub * nsub)](
        weight, dst, indices, values, out_f, in_f, block_size, nsub,
        weight.stride(0), weight.stride(1), dst.stride(0), dst.stride(1), indices.stride(0), indices.stride(1),
        values.stride(0), values.stride(1), values.stride(2),
        SUB=sub, UPCAST=up, num_warps=4,
    )
    return dst


def _prune_sparse_configs(configs, named_args, **kwargs):
    """lora._prune_gemm_configs, and with the mask also BLOCK_M <= 64: compiled for sm_90 (triton 3.9, bf16,
    R_PAD 16, 32 x 32 blocks), the masked LoRA epilogue of 128x128 w8 and 128x64 w4 still spilled 96 / 208 B
    (the mask is drawn as (BLOCK_M, BLOCK_N) and transposed onto the out^T accumulator); 64-row ones none."""
    kept = _prune_gemm_configs(configs, named_args, **kwargs)
    if not kwargs.get("HAS_MASK", named_args.get("HAS_MASK", False)):
        return kept
    return [c for c in kept if c.kwargs["BLOCK_M"] <= 64]


@functools.lru_cache(maxsize=None)
def _sparse_gemm_tuned(db: int):
    """The autotuned fused GEMM for delta blocks of side ``db``: the LoRA GEMM's configs with BLOCK_K
    capped at db. Not yet tuned on a card of ours (device_check.sh times it against the dense path)."""
    seen, configs = set(), []
    for c in _GEMM_CONFIGS:
        kw = dict(c.kwargs, BLOCK_K=min(c.kwargs["BLOCK_K"], db))
        key = tuple(sorted(kw.items())) + (c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            configs.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return triton.autotune(configs=configs, key=["M_KEY", "N", "K", "R_PAD", "HAS_MASK", "HAS_LOWRANK", "DB"],
                           prune_configs_by={"early_config_prune": _prune_sparse_configs})(
        _sparse_gemm_kernel)


def sparse_block_gemm(a: torch.Tensor, weight: torch.Tensor, block_map: torch.Tensor, values: torch.Tensor,
                      lu: torch.Tensor | None, lv: torch.Tensor | None, bias: torch.Tensor | None, block_size: int,
                      transpose_w: bool, scale: float = 1.0, seed: int = 0, threshold: int = 0) -> torch.Tensor:
    """``a @ op(W + Δ) [+ scale * mask * (lu @ lv)] [+ bias]`` in a's dtype, one kernel, Δ in blocks.

    op(W') = W'^T when ``transpose_w`` (forward: a (M, in) -> (M, out)), W' otherwise (dX: a (M, out) ->
    (M, in)). weight (out, in) any dtype and strides; block_map (cdiv(out, b), cdiv(in, b)) int32 block
    ids (-1: none); values (nblocks, b, b); b a power of two >= 16. lu (M, R), lv (R, N) or both None;
    the mask of (m, n) is ``draw(seed, m * N + n) >= threshold`` (none when threshold == 0, the default).
    """
    M = a.shape[0]
    if transpose_w:
        N, K = weight.shape
        sw = (weight.stride(1), weight.stride(0))          # (k, n) = W[n, k]
        sm = (block_map.stride(1), block_map.stride(0))
        sv = (values.stride(2), values.stride(1))
    else:
        K, N = weight.shape
        sw = (weight.stride(0), weight.stride(1))
        sm = (block_map.stride(0), block_map.stride(1))
        sv = (values.stride(1), values.stride(2))
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return out
    has_low = lu is not None
    R = lu.shape[1] if has_low else 0
    if has_low:
        lv, scale = scale_onto_lv(lv, scale)
    args = (a, weight, block_map, values, lu if has_low else out, lv if has_low else out,
            bias if bias is not None else out, out, M, N, K, R, triton.next_power_of_2(M),
            a.stride(0), a.stride(1), sw[0], sw[1], sm[0], sm[1], values.stride(0), sv[0], sv[1],
            lu.stride(0) if has_low else 0, lu.stride(1) if has_low else 0,
            lv.stride(0) if has_low else 0, lv.stride(1) if has_low else 0, out.stride(0), out.stride(1),
            scale, seed, threshold)
    meta = dict(HAS_BIAS=bias is not None, HAS_LOWRANK=has_low, HAS_MASK=has_low and threshold > 0, DB=block_size,
                R_PAD=r_pad(max(R, 1)), DOT_PRECISION=_dot_precision(a.dtype), UPCAST=_upcast(a.dtype))
    cfg = gemm_launch_config(a, _TEST_BLOCKS)
    if cfg is not None:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], block_size)  # a K step never crosses a block column
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _wrap(_sparse_gemm_kernel)[grid](*args, **meta, **cfg)
    else:
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
        _wrap(_sparse_gemm_tuned(block_size))[grid](*args, **meta)
    return out


def sparse_sddmm_blocks(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 (nblocks, b, b): block i = ``dy[:, rows_i]^T @ x[:, cols_i]``, rows_i / cols_i the block's
    rows and columns of W (out, in); positions outside W (clipped edge blocks) are 0.

    dy (M, out), x (M, in), any strides; indices (nblocks, 2) block (row, col).
    """
    M, N = dy.shape
    K = x.shape[1]
    nb, b = indices.shape[0], int(block_size)
    explicit = _use_explicit_blocks(x)
    sub = _sub_for(b, explicit)
    nsub = triton.cdiv(b, sub)
    # BLOCK_M=64: a (SUB, 64) tile of dy and a (64, SUB) tile of x per step; not measured on a GPU.
    block_m = _TEST_BLOCKS["SDDMM_M"] if explicit else 64
    per, split = split_chunk(M, split_count(x, nb * nsub * nsub, M, block_m), block_m)
    if nb == 0 or M == 0:
        return torch.zeros((nb, b, b), device=x.device, dtype=torch.float32)
    part = torch.empty((split, nb, b, b), device=x.device, dtype=torch.float32)
    _wrap(_sddmm_block_kernel)[(nb, nsub * nsub, split)](
        dy, x, indices, part, M, N, K, b, nsub, per,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), indices.stride(0), indices.stride(1),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        SUB=sub, BLOCK_M=block_m, DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_upcast(x.dtype),
        num_warps=4, num_stages=1 if explicit else 3,
    )
    # Partials are added in a fixed order: deterministic, no atomics.
    return part[0] if split == 1 else part.sum(0)


def sparse_sddmm_tiles(dy: torch.Tensor, x: torch.Tensor, tile_list: torch.Tensor, tile_count: torch.Tensor,
                       starts: torch.Tensor, order: torch.Tensor, loc: torch.Tensor, tile: int) -> torch.Tensor:
    """fp32 (nnz,): entry e = ``dy[:, row_e] . x[:, col_e]``, by T x T tiles of W (T = ``tile``).

    dy (M, out), x (M, in), any strides; the rest is a ``fastpeft.ops.sparse.TilePlan``'s bucketing:
    tile_list (ntiles,) int32 (non-empty tiles first), tile_count (1,) int32, starts (ntiles + 1,) int32,
    order (nnz,) int32 (tile-sorted position -> entry), loc (nnz,) int32 (row * T + col inside the tile).
    """
    M, N = dy.shape
    K = x.shape[1]
    nnz = order.shape[0]
    ntiles = tile_list.shape[0]
    explicit = _use_explicit_blocks(x)
    if nnz == 0 or M == 0 or ntiles == 0:
        return torch.zeros((nnz,), device=x.device, dtype=torch.float32)
    if explicit:
        block_m, block_e, programs = _TEST_BLOCKS["SDDMM_M"], _TEST_BLOCKS["BLOCK_E"], _TEST_BLOCKS["TILE_PROGRAMS"]
    else:
        # BLOCK_M=64 keeps a (T, 64) + (64, T) pair of tiles per step; 2 programs per SM walk the tiles.
        # Not measured on a GPU.
        block_m, block_e, programs = 64, 128, 2 * _sm_count(x.device.index or 0)
    grid = max(1, min(programs, ntiles, nnz))
    per, split = split_chunk(M, split_count(x, grid, M, block_m), block_m)
    scratch = torch.empty((split * grid, tile * tile), device=x.device, dtype=torch.float32)
    part = torch.empty((split, nnz), device=x.device, dtype=torch.float32)
    _wrap(_sddmm_tile_kernel)[(grid, split)](
        dy, x, tile_list, tile_count, starts, order, loc, scratch, part,
        M, N, K, triton.cdiv(K, tile), per,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), part.stride(0),
        T=tile, BLOCK_M=block_m, BLOCK_E=block_e, DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_upcast(x.dtype),
        num_warps=4, num_stages=1 if explicit else 2,
    )
    return part[0] if split == 1 else part.sum(0)


def sparse_gather_dot(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """fp32 (nnz,): entry e = ``dy[:, row_e] . x[:, col_e]`` for flat row-major indices into (out, in)."""
    M = dy.shape[0]
    K = x.shape[1]
    nnz = indices.shape[0]
    if nnz == 0 or M == 0:
        return torch.zeros((nnz,), device=x.device, dtype=torch.float32)
    explicit = _use_explicit_blocks(x)
    # 64 entries x 32 rows a step: 2048 products per step, two loads each; not measured on a GPU. 64 x 64
    # spills on triton 3.6 for sm_90 (255 registers, 40 B of stack; 42 registers on 3.9), 64 x 32 takes 128.
    block_e, block_m = (_TEST_BLOCKS["BLOCK_E"], _TEST_BLOCKS["SDDMM_M"]) if explicit else (64, 32)
    programs = triton.cdiv(nnz, block_e)
    per, split = split_chunk(M, split_count(x, programs, M, block_m), block_m)
    part = torch.empty((split, nnz), device=x.device, dtype=torch.float32)
    _wrap(_gather_dot_kernel)[(programs, split)](
        dy, x, indices, part, M, nnz, K, per,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), indices.stride(0), part.stride(0),
        BLOCK_E=block_e, BLOCK_M=block_m, num_warps=4,
    )
    return part[0] if split == 1 else part.sum(0)


# ----------------------------------------------------------------------------------------------------
# torch.library registration: torch.compile(fullgraph=True) traces these ops and the kernels inside.
# ----------------------------------------------------------------------------------------------------

if _HAS_TRITON_OP:
    @_library_op("fastpeft::sparse_densify", mutates_args=())
    def _sparse_densify_op(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, block_size: int,
                           dtype: torch.dtype) -> torch.Tensor:
        with _op_body():
            return sparse_densify(weight, indices, values, block_size, dtype)

    @_library_op("fastpeft::sparse_block_gemm", mutates_args=())
    def _sparse_block_gemm_op(a: torch.Tensor, weight: torch.Tensor, block_map: torch.Tensor, values: torch.Tensor,
                              lu: torch.Tensor | None, lv: torch.Tensor | None, bias: torch.Tensor | None,
                              block_size: int, transpose_w: bool, scale: float, seed: int,
                              threshold: int, seed_t: torch.Tensor | None = None) -> torch.Tensor:
        # seed_t: a seed drawn inside a compiled region, as a tensor (see _common.eager_or_op).
        with _op_body():
            return sparse_block_gemm(a, weight, block_map, values, lu, lv, bias, block_size, transpose_w, scale,
                                     _seed(seed, seed_t), threshold)

    @_library_op("fastpeft::sparse_sddmm_blocks", mutates_args=())
    def _sparse_sddmm_blocks_op(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                                block_size: int) -> torch.Tensor:
        with _op_body():
            return sparse_sddmm_blocks(dy, x, indices, block_size)

    @_library_op("fastpeft::sparse_sddmm_tiles", mutates_args=())
    def _sparse_sddmm_tiles_op(dy: torch.Tensor, x: torch.Tensor, tile_list: torch.Tensor, tile_count: torch.Tensor,
                               starts: torch.Tensor, order: torch.Tensor, loc: torch.Tensor,
                               tile: int) -> torch.Tensor:
        with _op_body():
            return sparse_sddmm_tiles(dy, x, tile_list, tile_count, starts, order, loc, tile)

    @_library_op("fastpeft::sparse_gather_dot", mutates_args=())
    def _sparse_gather_dot_op(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        with _op_body():
            return sparse_gather_dot(dy, x, indices)

    # As in lora.py: under TRITON_INTERPRET the kernels would run on fake tensors, so the fakes are
    # given explicitly (shapes only); on GPUs triton_op derives them by tracing the launchers.
    if INTERPRET:
        @_sparse_densify_op.register_fake
        def _(weight, indices, values, block_size, dtype):
            return weight.new_empty(weight.shape, dtype=dtype)

        @_sparse_block_gemm_op.register_fake
        def _(a, weight, block_map, values, lu, lv, bias, block_size, transpose_w, scale, seed, threshold, seed_t=None):
            return a.new_empty((a.shape[0], weight.shape[0] if transpose_w else weight.shape[1]))

        @_sparse_sddmm_blocks_op.register_fake
        def _(dy, x, indices, block_size):
            return x.new_empty((indices.shape[0], block_size, block_size), dtype=torch.float32)

        @_sparse_sddmm_tiles_op.register_fake
        def _(dy, x, tile_list, tile_count, starts, order, loc, tile):
            return x.new_empty((order.shape[0],), dtype=torch.float32)

        @_sparse_gather_dot_op.register_fake
        def _(dy, x, indices):
            return x.new_empty((indices.shape[0],), dtype=torch.float32)

    # Eager calls launch directly (see _common.eager_or_op); torch.compile traces the registered ops.
    densify_op = eager_or_op(sparse_densify, torch.ops.fastpeft.sparse_densify)
    block_gemm_op = eager_or_op(sparse_block_gemm, torch.ops.fastpeft.sparse_block_gemm)
    sddmm_blocks_op = eager_or_op(sparse_sddmm_blocks, torch.ops.fastpeft.sparse_sddmm_blocks)
    sddmm_tiles_op = eager_or_op(sparse_sddmm_tiles, torch.ops.fastpeft.sparse_sddmm_tiles)
    gather_dot_op = eager_or_op(sparse_gather_dot, torch.ops.fastpeft.sparse_gather_dot)
else:  # torch < 2.6: plain launchers (eager only)
    densify_op, block_gemm_op = sparse_densify, sparse_block_gemm
    sddmm_blocks_op, sddmm_tiles_op, gather_dot_op = sparse_sddmm_blocks, sparse_sddmm_tiles, sparse_gather_dot


# ----------------------------------------------------------------------------------------------------
# block-fused GEMM vs densify + cuBLAS: picked per shape by measuring both once
# ----------------------------------------------------------------------------------------------------

GEMM_CHOICES = ("auto", "fused", "dense", "tma")
_choice_cache: dict = {}


def gemm_mode() -> str:
    return env_choice("FASTPEFT_SPARSE_GEMM", GEMM_CHOICES)


def choose_sparse_gemm(key: tuple, block_size: int, run_fused, run_dense, device: torch.device,
                       run_tma=None) -> str:
    """``"fused"``, ``"dense"`` or (where ``run_tma`` is offered: sm_90+) ``"tma"`` for this shape key.

    ``"dense"`` wherever the fused GEMM does not take the block size (block_size 1, b < 16, b not a
    power of two), whatever FASTPEFT_SPARSE_GEMM says. Otherwise FASTPEFT_SPARSE_GEMM=fused|dense|tma
    forces one (tma where not offered: a ValueError naming what is); with ``auto`` the interpreter runs
    fused (so that it is tested), and on CUDA all offered are timed once (``do_bench`` median, after a
    first call that autotunes the kernels) and the fastest is cached, except in deterministic mode
    (``fastpeft.set_deterministic``, ``torch.use_deterministic_algorithms(True)``: pinned to dense, so a
    timing-dependent choice cannot change the bits between runs) and while torch.compile traces (dense).
    """
    mode = gemm_mode()
    if not fused_gemm_ok(block_size):
        return "dense"
    run = {"fused": run_fused, "dense": run_dense}
    if run_tma is not None:
        run["tma"] = run_tma
    return timed_choice(_choice_cache, key, mode, device, run, "dense")
