"""Hopper-grade fused LoRA GEMM: ``out = a @ b + scale * mask * (lu @ lv) + bias`` with tensor descriptors
(TMA) and persistent tiles, the sm_90+ counterpart of ``lora._lora_gemm_kernel``.

- a (M, K) and b are read through ``tl.make_tensor_descriptor`` (TMA: no per-element address or mask
  registers, bounds handled by the hardware, loads pipelined through shared memory); the output tile is
  written through a descriptor too. b is taken as it lies in memory: (N, K) rows (the forward, b = W^T)
  or (K, N) rows (dX, b = W).
- Persistent: ``min(#SMs, #tiles)`` programs walk the output tiles in grouped order (GROUP_M row-blocks
  share their b tiles in L2), as Triton's persistent matmul tutorial does; its autotune space.
- Epilogue: the rank-R update is one more ``tl.dot`` into the accumulator with ``scale`` folded into lu
  (rounded once to lv's dtype, as in ``lora._lora_gemm_kernel``); bias added before the single store.
  With the dropout mask (dX) the update is formed and masked in sub-tiles of at most 64 columns, the
  mask redrawn from the seed by ``_common._keep_mask_tile``: the same Philox stream as every other fastpeft
  kernel, bit for bit (element (m, n) keeps when ``draw(seed, m * N + n) >= threshold``).

- The shrink fused (``lora_forward_tma``, the LoRA forward's "tma-shrink" path): the programs holding column
  block 0 of each row block come first in tile order and also accumulate u = drop(x) A^T from the x tiles
  their K loop loads (A through its own descriptor, x's mask redrawn), store it (fp32, saved for the
  backward) and raise the row block's flag (release); the other tiles of the row block finish their own K
  loop, wait for the flag (acquire) and read u. x is read once for the GEMM and the shrink, and no tile
  redoes u. Deadlock-free because every producer precedes its waiters in tile order and the persistent
  programs (at most one per SM) are all resident. With ``col_scale`` g: DoRA's plain forward (g ⊙ (...) + b).
- The dY pass fused (``lora_backward_tma``, the backward's "tma-dy" path): dX's GEMM whose column-block-0
  tiles accumulate v = dY B from the dY tiles they load (B^T through a descriptor) and, for each dY tile,
  dY_tile^T u into their row block's fp32 partial of dB (added in a fixed order afterwards), then publish v
  as above; dY is read once for dX, v and dB. ``dora_backward_tma``: the same on G = dY ⊙ g, scaled in
  registers as dY's tiles load, with the magnitude's partials Σ dY (y - b) computed by column block 1's
  tiles from y read inside the GEMM.
- Many adapters per batch (``multi_forward_tma``, the no-grad prefill's "fused" path of ``ops.multi``): the
  same producers compute each row's u = x A_a^T with its own adapter a = ids[m] (the block's first adapter
  from the GEMM's x tiles, any further one in a K loop of its own), and every tile adds, per adapter present
  in its rows, s_a u B_a^T as one more MMA into its accumulator: y = x W^T + b + the adapters in one kernel.
- The flags are the only atomics: they order programs and sum nothing.

Needs sm_90+ and a triton with ``tl.make_tensor_descriptor`` (3.4+; written against the 3.6 API, also
compiles on 3.9): ``tma_supported(device)``. TMA needs 16-byte aligned rows, so K and N must be multiples
of 16 / itemsize (8 for bf16 / fp16): ``tma_shapes_ok``. The low-rank operands lu, lv and the bias are
small and read with plain loads (any strides, any rank).

This module imports only torch, triton and its sibling ``lora``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET, getenv, is_deterministic
from ._common import (_cast, _dot_precision, _grouped_coords, _keep_mask_tile, _lowrank_bias_part, _mma, _sm_count,
                      _pow2_part, _upcast, _use_explicit_blocks, r_pad, scale_onto_lv)

# ----------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _scaled(a, gk_ptr, off_k, K, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """a (BLOCK_M, BLOCK_K) with column k times g[off_k + k], in fp32 and rounded back to a's dtype (DoRA's
    G = dY ⊙ g, rounded as every fastpeft DoRA kernel rounds it)."""
    rk = off_k + tl.arange(0, BLOCK_K)
    gk = tl.load(gk_ptr + rk, mask=rk < K, other=0.0)
    return _cast(a.to(tl.float32) * gk[None, :], a.dtype, UPCAST)


@triton.jit
def _b_tile(b_desc, off_n, off_k, B_NK: tl.constexpr):
    """b's (BLOCK_K, BLOCK_N) tile at (off_k, off_n): a transposed (N, K)-rows tile when B_NK, else as stored."""
    if B_NK:
        b = tl.trans(b_desc.load([off_n, off_k]))
    else:
        b = b_desc.load([off_k, off_n])
    return b


@triton.jit
def _k_loop(a_desc, b_desc, off_m, off_n, k_tiles, K, gk_ptr, B_NK: tl.constexpr, K_SCALE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of a @ b at (off_m, off_n), a and b through their descriptors; K_SCALE:
    a's columns times gk (K,) first (in registers: the tensor cores read a from there)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_tiles):
        off_k = kt * BLOCK_K
        a = a_desc.load([off_m, off_k])  # out-of-bounds rows / columns read as zeros (TMA)
        if K_SCALE:
            a = _scaled(a, gk_ptr, off_k, K, UPCAST, BLOCK_K)
        acc = _mma(a, _b_tile(b_desc, off_n, off_k, B_NK), acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _k_loop_shrink(a_desc, b_desc, la_desc, off_m, off_n, rm, M, K, R, k_tiles, seed, threshold, pu_ptr, part_ptr,
                   stride_pum, gk_ptr, la_row, B_NK: tl.constexpr, X_MASK: tl.constexpr, DB_PART: tl.constexpr,
                   K_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``_k_loop`` plus u (BLOCK_M, R_PAD) fp32 = drop-mask(a) @ la^T from the same a tiles: la (R, K) through
    its descriptor from its row ``la_row`` (rows past the descriptor's read as zeros), a's mask of (m, k) redrawn
    from draw(seed, m K + k).
    DB_PART (the backward, a = dY): also a^T @ pu for each K step, pu the rows rm of the forward's u (M, R),
    stored as rows [off_k, off_k + BLOCK_K) of this row block's (K, R) fp32 partial of dB at part_ptr.
    K_SCALE (DoRA's backward): a's columns times gk first, for every product."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    rr = tl.arange(0, R_PAD)
    if DB_PART:
        pu = tl.load(pu_ptr + rm[:, None].to(tl.int64) * stride_pum + rr[None, :],
                     mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
    for kt in range(k_tiles):
        off_k = kt * BLOCK_K
        a = a_desc.load([off_m, off_k])
        if K_SCALE:
            a = _scaled(a, gk_ptr, off_k, K, UPCAST, BLOCK_K)
        acc = _mma(a, _b_tile(b_desc, off_n, off_k, B_NK), acc, DOT_PRECISION, UPCAST)
        la = _cast(tl.trans(la_desc.load([la_row, off_k])), a.dtype, UPCAST)
        if DB_PART:
            # dB's partial rows: the same dY tile, transposed, against u; u rounded to dY's dtype as the dB
            # shrink rounds it (the tensor cores take one dtype).
            part = _mma(tl.trans(a), _cast(pu, a.dtype, UPCAST), tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32),
                        DOT_PRECISION, UPCAST)
            rk = off_k + tl.arange(0, BLOCK_K)
            tl.store(part_ptr + rk[:, None].to(tl.int64) * R + rr[None, :], part,
                     mask=(rk < K)[:, None] & (rr < R)[None, :])
        if X_MASK:
            # K is a multiple of 8 (TMA rows) and off_k of BLOCK_K: each Philox block is 4 columns of a row.
            a = tl.where(_keep_mask_tile(seed, rm, off_k, K, threshold, BLOCK_M, BLOCK_K, True), a, 0.0)
        u = _mma(a, la, u, DOT_PRECISION, UPCAST)
    return acc, u


@triton.jit
def _k_loop_dm(a_desc, b_desc, y_desc, off_m, off_n, k_tiles, K, gk_ptr, yb_ptr, dm_ptr, B_NK: tl.constexpr,
               DM_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``_k_loop`` with K_SCALE (DoRA's G = a ⊙ gk) plus, from the unscaled a, the column sums over these rows
    of a ⊙ (y - yb) (DoRA's magnitude: y (M, K) through its descriptor, yb (K,) with DM_BIAS), stored as this
    row block's (K,) fp32 partial at dm_ptr. Run by column block 1's tiles, apart from the producers' work."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_tiles):
        off_k = kt * BLOCK_K
        a = a_desc.load([off_m, off_k])
        rk = off_k + tl.arange(0, BLOCK_K)
        yt = y_desc.load([off_m, off_k]).to(tl.float32)  # rows past M read as zeros, as a's
        if DM_BIAS:
            yt -= tl.load(yb_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        tl.store(dm_ptr + rk, tl.sum(a.to(tl.float32) * yt, axis=0), mask=rk < K)
        a = _scaled(a, gk_ptr, off_k, K, UPCAST, BLOCK_K)
        acc = _mma(a, _b_tile(b_desc, off_n, off_k, B_NK), acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _tma_store_part(acc, lu, off_m, n0, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr, stride_lvn, seed,
                    threshold, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                    SUB_N: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Columns [n0, n0 + SUB_N) of a tile: acc (BLOCK_M, SUB_N) fp32 [+ mask * (lu @ lv)] [+ bias], stored
    through the output descriptor (rows and columns past M, N are clipped by the hardware)."""
    # N is a multiple of 8 (TMA rows): N_ALIGNED.
    acc, rn, n_ok = _lowrank_bias_part(acc, lu, off_m + tl.arange(0, BLOCK_M), n0, lv_ptr, bias_ptr, N, R, stride_lvr,
                                       stride_lvn, seed, threshold, HAS_BIAS, HAS_MASK, True, BLOCK_M, SUB_N, R_PAD,
                                       DOT_PRECISION, UPCAST)
    out_desc.store([off_m, n0], _cast(acc, out_ptr.dtype.element_ty, UPCAST))


@triton.jit
def _gemm_descs(a_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_b, stride_om, B_NK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_N: tl.constexpr):
    """``(a_desc, b_desc, out_desc, num_m, num_n, k_tiles)`` of a persistent TMA GEMM out (M, N) = a (M, K) @ b:
    b as (N, K) rows when B_NK, else (K, N) rows; the output stored in (BLOCK_M, SUB_N) sub-tiles."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_NK:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1], block_shape=[BLOCK_M, SUB_N])
    return a_desc, b_desc, out_desc, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)


@triton.jit
def _shrink_first_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of ``tile`` when the shrink is fused: tiles 0 .. num_m - 1 are the producers (m, 0), in
    row order; the rest are the other columns (m, 1 ..) in grouped order. Every producer comes before the
    tiles that wait for it, which makes the wait deadlock-free for resident persistent programs."""
    producer = tile < num_m
    pm, pn = _grouped_coords(tl.maximum(tile - num_m, 0), num_m, tl.maximum(num_n - 1, 1), GROUP_M)
    return tl.where(producer, tile, pm), tl.where(producer, 0, pn + 1)


@triton.jit(do_not_specialize=["seed", "threshold", "M_KEY"])
def _lora_gemm_tma_kernel(
    # pointers: a (M, K) rows; b (N, K) rows when B_NK (forward: W) else (K, N) rows (dX: W); lu (M, R);
    # lv (R, N) by strides; bias (N,); out (M, N) rows; SHRINK: la (R, K) rows (A) and flags (cdiv(M, BLOCK_M),)
    # int32 zeros; COL_SCALE: g (N,) fp32; DB_PART: pu (M, R) fp32 (the forward's u) and part (cdiv(M, BLOCK_M),
    # K, R) fp32
    a_ptr, b_ptr, lu_ptr, lv_ptr, bias_ptr, out_ptr, la_ptr, flags_ptr, g_ptr, pu_ptr, part_ptr, y_ptr, yb_ptr, dm_ptr,
    # sizes (M_KEY: M's next power of two, the autotuner's key only)
    M, N, K, R, M_KEY,
    # strides (the inner stride of a, b, la and out is 1: TMA)
    stride_am, stride_b, stride_lum, stride_lur, stride_lvr, stride_lvn, stride_om, stride_la, stride_pum,
    # low-rank term: scale * mask * (lu @ lv), mask of (m, n) from draw(seed, m * N + n) >= threshold;
    # SHRINK: lu = shrink_scale * drop(a) @ la^T, a's mask of (m, k) from draw(seed, m * K + k) >= threshold
    scale, shrink_scale, seed, threshold,
    # meta-parameters (NUM_SMS: persistent programs)
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, B_NK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, R_PAD: tl.constexpr,
    NUM_SMS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SHRINK: tl.constexpr = False,
    X_MASK: tl.constexpr = False, COL_SCALE: tl.constexpr = False, DB_PART: tl.constexpr = False,
    K_SCALE: tl.constexpr = False, DM_PART: tl.constexpr = False, DM_BIAS: tl.constexpr = False,
):
    # Not warp-specialized: compiled offline for sm_90 (triton 3.6 and 3.9, this kernel with the K loop as
    # tl.range(k_tiles, warp_specialize=True)), every 4-warp config crashes the compiler (NVGPUWarpSpecialization
    # pass) and every 8-warp config comes out with the same registers and shared memory as without the flag.
    # The masked epilogue works on sub-tiles of at most 64 columns (see lora._lora_gemm_kernel).
    SUB_N: tl.constexpr = BLOCK_N if (not HAS_MASK or BLOCK_N <= 64) else 64
    a_desc, b_desc, out_desc, num_m, num_n, k_tiles = _gemm_descs(a_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_b,
                                                                  stride_om, B_NK, BLOCK_M, BLOCK_N, BLOCK_K, SUB_N)
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    y_desc = a_desc
    if DM_PART:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if SHRINK:
        la_desc = tl.make_tensor_descriptor(la_ptr, shape=[R, K], strides=[stride_la, 1], block_shape=[R_PAD, BLOCK_K])
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS):
        if SHRINK:
            pid_m, pid_n = _shrink_first_coords(tile, num_m, num_n, GROUP_M)
        else:
            pid_m, pid_n = _grouped_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rm = off_m + tl.arange(0, BLOCK_M)
        lu_ptrs = lu_ptr + rm[:, None].to(tl.int64) * stride_lum + rr[None, :] * stride_lur
        lu_ok = (rm < M)[:, None] & r_ok[None, :]
        if not SHRINK:
            acc = _k_loop(a_desc, b_desc, off_m, off_n, k_tiles, K, g_ptr, B_NK, K_SCALE, BLOCK_M, BLOCK_N, BLOCK_K,
                          DOT_PRECISION, UPCAST)
            lu = tl.load(lu_ptrs, mask=lu_ok, other=0.0)
        elif pid_n == 0:
            # Producer of row block pid_m: u = shrink_scale * drop(a) @ la^T from the a tiles this K loop
            # loads anyway, stored (fp32) and published through the block's flag.
            acc, u = _k_loop_shrink(a_desc, b_desc, la_desc, off_m, off_n, rm, M, K, R, k_tiles, seed, threshold,
                                    pu_ptr, part_ptr + pid_m.to(tl.int64) * K * R, stride_pum, g_ptr, 0, B_NK, X_MASK,
                                    DB_PART, K_SCALE, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD, DOT_PRECISION, UPCAST)
            lu = u * shrink_scale
            tl.store(lu_ptrs, lu, mask=lu_ok)
            tl.debug_barrier()  # every thread's part of u is written before the flag is raised
            tl.atomic_xchg(flags_ptr + pid_m, 1, sem="release")
        else:
            if not DM_PART:
                acc = _k_loop(a_desc, b_desc, off_m, off_n, k_tiles, K, g_ptr, B_NK, K_SCALE, BLOCK_M, BLOCK_N,
                              BLOCK_K, DOT_PRECISION, UPCAST)
            elif pid_n == 1:  # DoRA's magnitude partials, on a tile that does no producer's work
                acc = _k_loop_dm(a_desc, b_desc, y_desc, off_m, off_n, k_tiles, K, g_ptr, yb_ptr,
                                 dm_ptr + pid_m.to(tl.int64) * K, B_NK, DM_BIAS, BLOCK_M, BLOCK_N, BLOCK_K,
                                 DOT_PRECISION, UPCAST)
            else:
                acc = _k_loop(a_desc, b_desc, off_m, off_n, k_tiles, K, g_ptr, B_NK, K_SCALE, BLOCK_M, BLOCK_N,
                              BLOCK_K, DOT_PRECISION, UPCAST)
            # The producer of this row block came earlier in tile order (``_shrink_first_coords``), so it
            # runs or has run on a resident program: wait for its flag, then read u past L1.
            while tl.atomic_add(flags_ptr + pid_m, 0, sem="acquire") == 0:
                pass
            lu = tl.load(lu_ptrs, mask=lu_ok, other=0.0, cache_modifier=".cg")

        _tma_lowrank_epilogue(acc, lu, off_m, off_n, out_desc, out_ptr, lv_ptr, bias_ptr, g_ptr, M, N, R, stride_lvr,
                              stride_lvn, scale, seed, threshold, HAS_BIAS, HAS_MASK, COL_SCALE, BLOCK_M, BLOCK_N,
                              R_PAD, DOT_PRECISION, UPCAST)


@triton.jit
def _tma_lowrank_epilogue(acc, lu, off_m, off_n, out_desc, out_ptr, lv_ptr, bias_ptr, g_ptr, M, N, R, stride_lvr,
                          stride_lvn, scale, seed, threshold, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                          COL_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A tile's epilogue: acc (BLOCK_M, BLOCK_N) fp32 + scale * mask * (lu @ lv) [⊙ g] + bias, stored through
    the output descriptor at (off_m, off_n); lu (BLOCK_M, R_PAD) (rows of u, any float dtype), lv (R, N) by
    strides; the mask of (m, n) is draw(seed, m * N + n) >= threshold (HAS_MASK), g (N,) fp32 (COL_SCALE, not
    with the mask)."""
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    # Epilogue: s folded into lu, rounded once to lv's dtype (the tensor cores take one dtype).
    lu = _cast(lu.to(tl.float32) * scale, lv_ptr.dtype.element_ty, UPCAST)
    if not HAS_MASK:
        # The rank-R update is one more MMA into the same accumulator.
        rn = off_n + tl.arange(0, BLOCK_N)
        lv = tl.load(lv_ptr + rr[:, None] * stride_lvr + rn[None, :].to(tl.int64) * stride_lvn,
                     mask=r_ok[:, None] & (rn < N)[None, :], other=0.0)
        acc = _mma(lu, lv, acc, DOT_PRECISION, UPCAST)
        if COL_SCALE:  # DoRA: g ⊙ (a b + s lu lv), then the bias
            acc = acc * tl.load(g_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        _tma_store_part(acc, lu, off_m, off_n, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr, stride_lvn,
                        seed, threshold, HAS_BIAS, False, BLOCK_M, BLOCK_N, R_PAD, DOT_PRECISION, UPCAST)
    elif BLOCK_N <= 64:
        _tma_store_part(acc, lu, off_m, off_n, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr, stride_lvn,
                        seed, threshold, HAS_BIAS, True, BLOCK_M, BLOCK_N, R_PAD, DOT_PRECISION, UPCAST)
    else:
        # The mask applies to the product: halves (quarters at BLOCK_N 256) of the accumulator in turn.
        H: tl.constexpr = BLOCK_N // 2
        if H <= 64:
            _tma_store_halves(acc, lu, off_m, off_n, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr,
                              stride_lvn, seed, threshold, HAS_BIAS, BLOCK_M, H, R_PAD, DOT_PRECISION, UPCAST)
        else:
            Q: tl.constexpr = H // 2
            h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, H)), (0, 2, 1)))
            _tma_store_halves(h0, lu, off_m, off_n, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr,
                              stride_lvn, seed, threshold, HAS_BIAS, BLOCK_M, Q, R_PAD, DOT_PRECISION, UPCAST)
            _tma_store_halves(h1, lu, off_m, off_n + H, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr,
                              stride_lvn, seed, threshold, HAS_BIAS, BLOCK_M, Q, R_PAD, DOT_PRECISION, UPCAST)


@triton.jit
def _tma_store_halves(acc, lu, off_m, n0, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr, stride_lvn, seed,
                      threshold, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, H: tl.constexpr, R_PAD: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The masked ``_tma_store_part`` of columns [n0, n0 + 2 H), acc (BLOCK_M, 2 H), one half at a time."""
    h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, H)), (0, 2, 1)))
    _tma_store_part(h0, lu, off_m, n0, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr, stride_lvn, seed,
                    threshold, HAS_BIAS, True, BLOCK_M, H, R_PAD, DOT_PRECISION, UPCAST)
    _tma_store_part(h1, lu, off_m, n0 + H, out_desc, out_ptr, lv_ptr, bias_ptr, M, N, R, stride_lvr, stride_lvn, seed,
                    threshold, HAS_BIAS, True, BLOCK_M, H, R_PAD, DOT_PRECISION, UPCAST)

# ----------------------------------------------------------------------------------------------------
# many adapters per batch: the shrink and each row block's adapters fused into the GEMM
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _next_adapter(ids, a, NA):
    """The smallest adapter id above ``a`` among ``ids`` (NA when none): a row block's adapters, in turn."""
    return tl.min(tl.where(ids > a, ids, NA), axis=0)


@triton.jit
def _k_loop_u(a_desc, la_desc, off_m, la_row, k_tiles, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
              R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The shrink alone: (BLOCK_M, R_PAD) fp32 a[rows off_m ..] @ la[rows la_row ..]^T, both through their
    descriptors (a row block's second and later adapters; its tiles of a come from L2 by then)."""
    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for kt in range(k_tiles):
        off_k = kt * BLOCK_K
        a = a_desc.load([off_m, off_k])
        u = _mma(a, _cast(tl.trans(la_desc.load([la_row, off_k])), a.dtype, UPCAST), u, DOT_PRECISION, UPCAST)
    return u


@triton.jit
def _multi_lora_tma_kernel(
    # pointers: x (M, K) rows; w (N, K) rows (W); la (NA * R, K) rows (the A stack, adapter a from row a R);
    # lb (NA, N, R) by strides (the B stack); ids (M,) int in [-1, NA); ranks (NA,) int; scales (NA,) fp32;
    # bias (N,); u (M, R) fp32 scratch; flags (cdiv(M, 32),) int32 zeros; out (M, N) rows
    x_ptr, w_ptr, la_ptr, lb_ptr, ids_ptr, ranks_ptr, scales_ptr, bias_ptr, u_ptr, flags_ptr, out_ptr,
    # sizes (M_KEY: M's bucket, the autotuning key; not read)
    M, N, K, R, NA, M_KEY,
    # strides (the inner stride of x, w, la and out is 1: TMA)
    stride_xm, stride_w, stride_la, stride_lba, stride_lbn, stride_lbr, stride_um, stride_om,
    # meta-parameters (NUM_SMS: persistent programs)
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, R_PAD: tl.constexpr, NUM_SMS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, SCALE_ON_B: tl.constexpr,
):
    x_desc, w_desc, out_desc, num_m, num_n, k_tiles = _gemm_descs(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_w,
                                                                  stride_om, True, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_N)
    la_desc = tl.make_tensor_descriptor(la_ptr, shape=[NA * R, K], strides=[stride_la, 1],
                                        block_shape=[R_PAD, BLOCK_K])
    rr = tl.arange(0, R_PAD)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS):
        pid_m, pid_n = _shrink_first_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rm = off_m + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        ids = tl.load(ids_ptr + rm, mask=m_ok, other=-1).to(tl.int32)
        first = _next_adapter(ids, -1, NA)  # NA: no row of this block has an adapter
        u_ptrs = u_ptr + rm[:, None].to(tl.int64) * stride_um + rr[None, :]
        u_ok = m_ok[:, None] & (rr < R)[None, :]
        if pid_n == 0:
            # Producer: the block's first adapter's shrink rides on the GEMM's K loop (x's tiles loaded once);
            # each further adapter of the block (rows of two sequences) runs a K loop of its own. Row m keeps
            # its own adapter's columns r < r_a: u_m = x_m A_a^T.
            a0 = tl.minimum(first, NA - 1)
            acc, ua = _k_loop_shrink(x_desc, w_desc, la_desc, off_m, off_n, rm, M, K, R, k_tiles, 0, 0, u_ptr,
                                     u_ptr, 0, u_ptr, a0 * R, True, False, False, False, BLOCK_M, BLOCK_N, BLOCK_K,
                                     R_PAD, DOT_PRECISION, UPCAST)
            u = tl.where((ids == first)[:, None] & (rr < tl.load(ranks_ptr + a0))[None, :], ua, 0.0)
            a = _next_adapter(ids, first, NA)
            while a < NA:
                ua = _k_loop_u(x_desc, la_desc, off_m, a * R, k_tiles, BLOCK_M, BLOCK_K, R_PAD, DOT_PRECISION,
                               UPCAST)
                u = tl.where((ids == a)[:, None] & (rr < tl.load(ranks_ptr + a))[None, :], ua, u)
                a = _next_adapter(ids, a, NA)
            tl.store(u_ptrs, u, mask=u_ok)
            tl.debug_barrier()  # every thread's part of u is written before the flag is raised
            tl.atomic_xchg(flags_ptr + pid_m, 1, sem="release")
        else:
            acc = _k_loop(x_desc, w_desc, off_m, off_n, k_tiles, K, u_ptr, True, False, BLOCK_M, BLOCK_N, BLOCK_K,
                          DOT_PRECISION, UPCAST)
            # The producer came earlier in tile order (``_shrink_first_coords``): wait for it, read u past L1.
            while tl.atomic_add(flags_ptr + pid_m, 0, sem="acquire") == 0:
                pass
            u = tl.load(u_ptrs, mask=u_ok, other=0.0, cache_modifier=".cg")
        # Epilogue: s_a folded into each row's u, rounded once to B's dtype; then one MMA per adapter of the
        # block, into the accumulator, with the other adapters' rows zeroed. SCALE_ON_B (fp16): where |s_a| > 1
        # its power of two goes onto B_a's tile (exact), the rest onto u (as ``_common.scale_onto_lv``): s_a u
        # overflows from |u| > 65504 / |s_a|.
        s_row = tl.load(scales_ptr + tl.maximum(ids, 0), mask=(ids >= 0) & (ids < NA), other=0.0)
        if SCALE_ON_B:
            s_row = s_row / _pow2_part(s_row)
        lu = _cast(u * s_row[:, None], lb_ptr.dtype.element_ty, UPCAST)
        rn = off_n + tl.arange(0, BLOCK_N)
        a = first
        while a < NA:
            lv = tl.load(lb_ptr + a.to(tl.int64) * stride_lba + rr[:, None] * stride_lbr
                         + rn[None, :].to(tl.int64) * stride_lbn,
                         mask=(rr < tl.load(ranks_ptr + a))[:, None] & (rn < N)[None, :], other=0.0)
            if SCALE_ON_B:
                lv = _cast(lv.to(tl.float32) * _pow2_part(tl.load(scales_ptr + a)), lb_ptr.dtype.element_ty, UPCAST)
            acc = _mma(tl.where((ids == a)[:, None], lu, tl.zeros_like(lu)), lv, acc, DOT_PRECISION, UPCAST)
            a = _next_adapter(ids, a, NA)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], _cast(acc, out_ptr.dtype.element_ty, UPCAST))


# ----------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------

# The autotune space of Triton's persistent matmul tutorial (BLOCK_M 128; BLOCK_N 128/256; BLOCK_K 64/128;
# 2-4 stages; 4/8 warps), pruned by _prune_tma_configs. Not yet timed on a card of ours:
# benchmarks/device_check.sh measures it against cuBLAS (the gate: >= 0.95x cuBLAS at 8192^2 x 4096
# with no epilogue before the epilogue can win).
_TMA_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm in (128,) for bn in (128, 256) for bk in (64, 128) for s in (2, 3, 4) for w in (4, 8)
]
# Shared memory of sm_90 per block (227 KiB), less what triton's epilogue and barriers take.
_SMEM_LIMIT = 220 * 1024


def _config_fits(c, has_mask: bool, r_pad: int = 16, itemsize: int = 2, shrink: bool = False,
                 x_mask: bool = False, db_part: bool = False, k_scale: bool = False, dm_part: bool = False) -> bool:
    """Whether a config fits sm_90: its pipelined a and b tiles (and, with the shrink fused, A's R_PAD x
    BLOCK_K tiles) in shared memory, and its fp32 accumulator plus the (BLOCK_M, R_PAD) tile of u within 160
    registers a thread (u twice with the shrink fused: its accumulator and its operand), or the accumulator
    within 64 with either mask, whose Philox draws need the rest (and, with x's mask, BLOCK_K 64 above R_PAD
    16 and 2 stages at R_PAD 64). The fused dY pass (``db_part``) keeps 8 warps and BLOCK_K 64, BLOCK_N 256
    only up to R_PAD 32 and, with the mask, BLOCK_N 128 up to R_PAD 32 (2 stages at 32); DoRA's (``k_scale``:
    G = dY ⊙ g in registers) only 128 x 128 x 64 at 8 warps, R_PAD 16, without the mask. Compiled for sm_90
    (triton 3.6 and 3.9, bf16, R_PAD 16-64), every config this keeps has no spill; among those it drops,
    128x128 w4 at R_PAD 64 (128 + 64) spills 8-32 B, 128x256 w4 over 1 KiB, x's mask at w4 144-1360 B, the dY
    pass at w4 or with the mask at R_PAD 64 150-1900 B, DoRA's elsewhere 8-272 B
    (benchmarks/results/sm90-resources-*.md). DoRA's dm partials (``dm_part``) pipeline y's (BLOCK_M, BLOCK_K) tiles
    beside dY's: 128 x 128 x 64 w8 at 4 stages needs 263,800 B of shared memory (sm_90, triton 3.6), over the card's
    232,448, so it is left out (before, the autotuner compiled it and its launch failed at every new shape)."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    smem = (c.num_stages * (bm + bn + (r_pad if shrink else 0) + (bm if dm_part else 0)) * bk * itemsize
            + bm * min(bn, 64 if has_mask else bn) * itemsize)
    threads = 32 * c.num_warps
    acc_regs = bm * bn // threads
    u_regs = bm * r_pad // threads * (2 if shrink else 1)
    if shrink and c.num_warps != 8:
        # The fused paths at 8 warps only: at 4 every masked variant spills, and each config is one more
        # compile in the autotuning the card's first call pays (benchmarks/device_check.sh's budget).
        return False
    if k_scale:  # DoRA's backward: G = dY ⊙ g formed in registers on top of the dY pass
        regs_ok = c.num_warps == 8 and bn == 128 and bk == 64 and r_pad <= 16 and not has_mask
    elif db_part:  # the producers' extra tiles (u's rows, dB's partial) beside v and the accumulator
        regs_ok = (c.num_warps == 8 and bk == 64 and r_pad <= 64 and (bn <= 128 or r_pad <= 32)
                   and (not has_mask or (bn <= 128 and (r_pad <= 16 or (r_pad <= 32 and c.num_stages <= 2)))))
    elif x_mask:
        regs_ok = (acc_regs <= 64 and (r_pad <= 16 or bk <= 64) and (r_pad <= 32 or c.num_stages <= 2)
                   and r_pad <= 64)
    else:
        regs_ok = acc_regs <= 64 if has_mask else acc_regs + u_regs <= 160
    return smem <= _SMEM_LIMIT and regs_ok


def _itemsize(named_args: dict, name: str) -> int:
    """Bytes an element of the launch's operand ``name`` (a tensor among the autotuner's arguments; 2 where it is
    absent, as in the offline tables): fp32 tiles take twice the shared memory of bf16 ones."""
    t = named_args.get(name)
    return t.element_size() if isinstance(t, torch.Tensor) else 2


def _prune_tma_configs(configs, named_args, **kwargs):
    def arg(name, default):
        return bool(kwargs.get(name, named_args.get(name, default)))
    r_pad = int(kwargs.get("R_PAD", named_args.get("R_PAD", 16)))
    return [c for c in configs if _config_fits(c, arg("HAS_MASK", False), r_pad, _itemsize(named_args, "a_ptr"),
                                               shrink=arg("SHRINK", False), x_mask=arg("X_MASK", False),
                                               db_part=arg("DB_PART", False), k_scale=arg("K_SCALE", False),
                                               dm_part=arg("DM_PART", False))]


def fits_itemsize(t: torch.Tensor, config: dict | None = None) -> int:
    """The bytes an element of operand ``t`` counts for in the ``*_fits`` rules: its own where the launch
    autotunes or runs the pinned config on a card, 2 under the explicit test config (the interpreter and
    FASTPEFT_AUTOTUNE=0), whose small one-stage tiles fit shared memory in any dtype, and with a ``config``
    given by the caller (the caller's to size)."""
    return 2 if config is not None or _use_explicit_blocks(t) else t.element_size()


def _rank_limit(fits) -> int:
    """The largest of the ranks 16 / 32 / 64 that ``fits(rank)`` holds (0: none), for the refusals' text."""
    return max((r for r in (16, 32, 64) if fits(r)), default=0)


@functools.lru_cache(maxsize=None)
def _has_config(rp: int, itemsize: int, has_mask: bool = False, **flags) -> bool:
    """Whether ``_config_fits`` keeps any autotune config for this launch (cached: the ops ask at every call
    whether a fused path is offered, and the answer depends on these constants only)."""
    return any(_config_fits(c, has_mask, rp, itemsize, **flags) for c in _TMA_CONFIGS)


# Explicit config for the interpreter and tests (small, so odd sizes cross tile edges; 3 persistent
# programs, so each walks several tiles) and the pinned one for deterministic mode (kept by the prune
# with and without the mask).
_TEST_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "NUM_SMS": 3, "num_warps": 4,
                "num_stages": 1}
_PINNED_TMA = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def pinned_tma(itemsize: int) -> dict:
    """Deterministic mode's config for operands of ``itemsize`` bytes: ``_PINNED_TMA``, at 2 stages for fp32
    (compiled for sm_90 with triton 3.6, fp32 with TF32: 3 stages take 262168-328768 B, which does not launch;
    2 stages fit every variant)."""
    return _PINNED_TMA if itemsize <= 2 else dict(_PINNED_TMA, num_stages=2)
# DoRA's magnitude partials are column block 1's work: with y, dX's K (the layer's in_features) must span two
# blocks of the widest autotuned BLOCK_N.
DM_MIN_BLOCK_N = 256
assert DM_MIN_BLOCK_N == max(c.kwargs["BLOCK_N"] for c in _TMA_CONFIGS)
# Every autotuned config's BLOCK_M (the dB partials of lora_backward_tma are cut by it before the launch).
_TUNED_BLOCK_M = 128
assert all(c.kwargs["BLOCK_M"] == _TUNED_BLOCK_M for c in _TMA_CONFIGS)


@functools.lru_cache(maxsize=None)
def _tuned():
    # Keyed on M's bucket (M_KEY, the next power of two), as the other GEMMs: batches padded to their longest
    # sequence change the token count at every step, and each new key is a tuning run (every config timed).
    # The flags of the fused shrink are zeroed before each timed run and before the launch that follows.
    return triton.autotune(configs=_TMA_CONFIGS,
                           key=["M_KEY", "N", "K", "R_PAD", "HAS_MASK", "B_NK", "SHRINK", "X_MASK", "COL_SCALE",
                                "DB_PART", "K_SCALE", "DM_PART", "DM_BIAS"],
                           prune_configs_by={"early_config_prune": _prune_tma_configs},
                           reset_to_zero=["flags_ptr"])(_lora_gemm_tma_kernel)


@functools.lru_cache(maxsize=None)
def _tuned_multi():
    # Keyed on M's bucket (M_KEY), not M: serving batches vary in size, and each new key is a tuning run.
    return triton.autotune(configs=_TMA_CONFIGS, key=["M_KEY", "N", "K", "R_PAD", "HAS_BIAS"],
                           prune_configs_by={"early_config_prune": _prune_multi_configs},
                           reset_to_zero=["flags_ptr"])(_multi_lora_tma_kernel)


def _prune_multi_configs(configs, named_args, **kwargs):
    """The fused shrink's rule (``_config_fits`` with ``shrink``: 8 warps, the accumulator and u twice within
    160 registers, the pipelined tiles in shared memory). Compiled for sm_90 at R_PAD 16 / 32 / 64 with every
    autotune config: every config it keeps has no spill on triton 3.6 and 3.9; of those it drops, the 4-warp
    ones spill 56-1744 B on 3.9 and do not compile on 3.6 (ConvertTritonGPUToLLVM fails), and at R_PAD 64
    BLOCK_N 256 spills 96-256 B on both."""
    r_pad = int(kwargs.get("R_PAD", named_args.get("R_PAD", 16)))
    return [c for c in configs if _config_fits(c, False, r_pad, _itemsize(named_args, "x_ptr"), shrink=True)]


# ----------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------


def tma_supported(device) -> bool:
    """Whether ``lora_gemm_tma`` can run on ``device``: a CUDA device of compute capability 9.0 or newer
    and a triton with ``tl.make_tensor_descriptor`` (or the interpreter, for tests on CPU tensors)."""
    if not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
        return False
    if INTERPRET:
        return True
    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.type != "cuda":
        return False
    if device.index is None:  # the current device, which can change
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9
    return _sm_major(device.index) >= 9


@functools.lru_cache(maxsize=None)
def _sm_major(index: int) -> int:
    """CUDA device ``index``'s compute capability major (0 without CUDA), looked up once: ``tma_supported``
    runs at every LoRA GEMM, and the lookup costs microseconds."""
    return torch.cuda.get_device_capability(index)[0] if torch.cuda.is_available() else 0


def waits_refusal() -> str | None:
    """Why the persistent kernels whose programs wait on each other's tiles (the fused shrink, the fused dY pass,
    the many-adapter prefill) may not have every program resident, or None. They launch one program per SM the
    device reports, and a waiting program spins until the producer of its row block has run: under CUDA MPS
    with an SM limit (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` below 100) fewer SMs are there than reported, and a
    producer that never gets one would leave the kernel spinning for ever. Read at every call."""
    pct = getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    try:
        limited = pct is not None and float(pct) < 100.0
    except ValueError:
        limited = True  # unreadable: assume a limit
    if limited:
        return (f"CUDA MPS limits this process's SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={pct}); the fused TMA "
                "paths need every persistent program resident")
    return None


def shrink_fits(rank: int, itemsize: int = 2) -> bool:
    """Whether ``lora_forward_tma`` has configs for this LoRA rank and operands of ``itemsize`` bytes (with and
    without x's mask): R_PAD <= 64 in 16-bit dtypes (beyond, u's accumulator and A's tiles do not fit beside
    the GEMM's: compiled for sm_90, every config spills or is pruned), <= 32 in fp32 (shared memory)."""
    rp = r_pad(rank)
    return rp <= 64 and all(_has_config(rp, itemsize, shrink=True, x_mask=xm) for xm in (False, True))


def _dm_block_n(dy: torch.Tensor, config: dict | None) -> int:
    cfg = _config_for(dy, config)
    return cfg["BLOCK_N"] if cfg is not None else DM_MIN_BLOCK_N


def dm_pass_fits(dy: torch.Tensor, in_features: int, config: dict | None = None) -> bool:
    """Whether ``dora_backward_tma`` can give DoRA's magnitude partials for a layer of ``in_features`` (dX's
    columns): column block 1 computes them, so dX must span two blocks of the launch's BLOCK_N (the widest
    autotuned one where the launch is autotuned)."""
    return triton.cdiv(in_features, _dm_block_n(dy, config)) >= 2


def dora_dy_pass_fits(rank: int, masked: bool, itemsize: int = 2, dm_part: bool = False) -> bool:
    """Whether ``dora_backward_tma`` has configs for this rank: R_PAD 16 without dX's mask (beyond, every
    config compiled for sm_90 spills: G's registers on top of the dY pass's), and one that fits shared memory
    for operands of ``itemsize`` bytes (``dm_part``: with y's tiles for the magnitude's partials, which leave no
    fp32 config)."""
    return (r_pad(rank) <= 16 and not masked
            and _has_config(r_pad(rank), itemsize, shrink=True, db_part=True, k_scale=True, dm_part=dm_part))


def dy_pass_fits(rank: int, masked: bool, itemsize: int = 2) -> bool:
    """Whether ``lora_backward_tma`` has configs for this rank: R_PAD <= 64, and <= 32 with dX's mask, and one
    that fits shared memory for operands of ``itemsize`` bytes."""
    return (r_pad(rank) <= (32 if masked else 64)
            and _has_config(r_pad(rank), itemsize, masked, shrink=True, db_part=True))


def _with_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself where TMA can address it (``_rows_ok``), else a copy with standard strides: ``contiguous()``
    keeps a size-1 row's odd stride, which TMA refuses."""
    return t if _rows_ok(t) else torch.empty(t.shape, device=t.device, dtype=t.dtype).copy_(t)


def _rows_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can address as it is: unit inner stride, 16-byte aligned base and row stride, rows that
    do not overlap (an expanded tensor's stride 0, as autograd hands the gradient of a sum, is no TMA stride)."""
    es = t.element_size()
    return (t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0
            and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]))


def tma_precision_ok(dtype: torch.dtype, forced: bool = False) -> bool:
    """Whether the ops offer the TMA kernels for operands of ``dtype`` to their timed choice: not fp32 at torch's
    default matmul precision ("highest", so ``_dot_precision`` gives ieee dots: no tensor cores; compiled for sm_90
    on triton 3.6 every autotune config kept for fp32 spilled 10-26 KiB of stack a thread, each compile took
    4-8 s, and cuBLAS's SGEMM is the floor anyway). TF32 allowed (``torch.set_float32_matmul_precision("high")``)
    and 16-bit dtypes: offered. A path the environment forces (``forced``) runs in any dtype, as do the tests under
    the interpreter."""
    return forced or INTERPRET or _dot_precision(dtype) != "ieee"


def tma_shapes_ok(*, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a (M, K) @ b (K, N) has TMA-compatible sizes: K and N whole 16-byte rows of a's dtype."""
    per = 16 // a.element_size()
    return a.dim() == 2 and b.dim() == 2 and a.shape[1] % per == 0 and b.shape[1] % per == 0


def _allocator(device):
    # Device-side descriptors need a small global scratch per program (triton asks through this).
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, device=device, dtype=torch.int8)
    return alloc


def lora_gemm_tma(*, a: torch.Tensor, b: torch.Tensor, lu: torch.Tensor, lv: torch.Tensor,
                  bias: torch.Tensor | None = None, scale: float = 1.0, seed=0, threshold: int = 0,
                  config: dict | None = None) -> torch.Tensor:
    """``a @ b + scale * mask * (lu @ lv) + bias`` in a's dtype, one persistent TMA kernel.

    a (M, K), b (K, N) (a view: forward ``W.t()`` or dX ``W``, both read in place), lu (M, R) fp32 or a's
    dtype, lv (R, N) any strides, bias (N,) or None. The mask of (m, n) is ``draw(seed, m * N + n) >=
    threshold`` (none when threshold == 0); ``seed`` an int or a one-element int64 device tensor.
    ``config``: explicit blocks (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, NUM_SMS]);
    default: autotuned on CUDA (pinned in deterministic mode), ``_TEST_CONFIG`` under the interpreter and
    with FASTPEFT_AUTOTUNE=0.
    Needs ``tma_supported(a.device)`` and ``tma_shapes_ok(a=a, b=b)``; a or b with other strides are copied.
    """
    return _launch(a, b, lu, lv, bias, scale, seed, threshold, config)


def lora_forward_tma(*, x: torch.Tensor, w_t: torch.Tensor, lora_A: torch.Tensor, lv: torch.Tensor,
                     bias: torch.Tensor | None = None, scale: float = 1.0, drop_scale: float = 1.0, seed=0,
                     threshold: int = 0, col_scale: torch.Tensor | None = None, config: dict | None = None) -> tuple:
    """``(y, u)`` of the LoRA forward in one persistent TMA kernel, the shrink fused into the GEMM:
    u = drop_scale * drop-mask(x) @ lora_A^T (M, R) fp32 and y = x @ w_t + scale * u @ lv + bias in x's dtype;
    with ``col_scale`` g (N,) fp32, DoRA's plain forward y = g ⊙ (x @ w_t + scale * u @ lv) + bias.

    x (M, K); w_t (K, N) (``W.t()``, read in place); lora_A (R, K); lv (R, N) (``B.t()``); x's mask of (m, k)
    is ``draw(seed, m * K + k) >= threshold`` (none when threshold == 0), as ``lora.lora_shrink`` draws it.
    The programs holding column block 0 of a row block (the producers, first in tile order) also
    accumulate that block's u from the x tiles their K loop loads, store it and raise the block's flag;
    the other tiles of the row block read u after the flag, so x is read once for the GEMM and the shrink.
    The wait needs every program resident (persistent: at most one per SM); under the interpreter, which
    runs programs one after another, one program walks all tiles. ``config`` as for ``lora_gemm_tma``.
    """
    if lora_A.dim() != 2 or lora_A.shape[1] != x.shape[1]:
        raise ValueError(f"lora_forward_tma: lora_A must be (R, K={x.shape[1]}), got {tuple(lora_A.shape)}")
    isz = fits_itemsize(x, config)
    if not shrink_fits(lora_A.shape[0], isz):
        raise ValueError(f"lora_forward_tma: rank {lora_A.shape[0]} is above what its configs hold for {x.dtype} "
                         f"(at most {_rank_limit(lambda r: shrink_fits(r, isz))})")
    lora_A = _with_rows(lora_A)
    u = torch.empty((x.shape[0], lora_A.shape[0]), device=x.device, dtype=torch.float32)
    if col_scale is not None and (col_scale.shape != (w_t.shape[1],) or col_scale.dtype != torch.float32):
        raise ValueError(f"lora_forward_tma: col_scale must be fp32 ({w_t.shape[1]},), got {col_scale.dtype} "
                         f"{tuple(col_scale.shape)}")
    y = _launch(x, w_t, u, lv, bias, scale, seed, 0, config, shrink=(lora_A, drop_scale, threshold),
                col_scale=col_scale)
    return y, u


def multi_forward_tma(*, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A_stack: torch.Tensor,
                      lora_B_stack: torch.Tensor, scalings: torch.Tensor, ids: torch.Tensor,
                      ranks: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Many adapters in one batch, without dropout, in one persistent TMA kernel:
    y_m = x_m W^T + b + s_a (x_m A_a^T) B_a^T with a = ids[m] (nothing for -1), in x's dtype.

    x (M, K); weight (N, K) (read in place); lora_A_stack (n, r_max, K); lora_B_stack (n, N, r_max); scalings
    (n,); ids (M,) int in [-1, n) (not checked here: rows of any other id get no adapter, as on the grouped
    kernels); ranks (n,) or None (all r_max):
    adapter a uses its first ranks[a] rows of A and columns of B. The programs holding column block 0 of a
    row block (first in tile order) compute u = x A_a^T for the block's rows, each with its own adapter:
    the first adapter present in the block from the x tiles the GEMM's K loop loads, each further one in a
    K loop of its own (so a block whose rows share one adapter, as a sequence's tokens do, costs what one
    adapter costs, and a block mixing d adapters d - 1 more shrinks of its rows). They publish u through the
    block's flag; every tile adds, per adapter present in its rows, s_a u B_a^T as one more MMA into its
    accumulator. No grouping, no host sync, no atomics in any sum. ``config`` as for ``lora_gemm_tma``.
    """
    m, k = x.shape
    if lora_A_stack.dim() != 3 or lora_A_stack.shape[2] != k:
        raise ValueError(f"multi_forward_tma: lora_A_stack must be (n, r_max, K={k}), got {tuple(lora_A_stack.shape)}")
    n, r_max = lora_A_stack.shape[0], lora_A_stack.shape[1]
    if lora_B_stack.shape != (n, weight.shape[0], r_max):
        raise ValueError(f"multi_forward_tma: lora_B_stack must be (n={n}, N={weight.shape[0]}, r_max={r_max}), "
                         f"got {tuple(lora_B_stack.shape)}")
    isz = fits_itemsize(x, config)
    if not shrink_fits(r_max, isz):
        raise ValueError(f"multi_forward_tma: r_max {r_max} is above what its configs hold for {x.dtype} (at most "
                         f"{_rank_limit(lambda r: shrink_fits(r, isz))})")
    if ids.shape != (m,) or scalings.shape != (n,) or ranks is not None and ranks.shape != (n,):
        got_ranks = None if ranks is None else tuple(ranks.shape)
        raise ValueError(f"multi_forward_tma: ids must be ({m},), scalings and ranks ({n},), got "
                         f"{tuple(ids.shape)}, {tuple(scalings.shape)}, {got_ranks}")
    if not tma_supported(x.device):
        raise RuntimeError(f"multi_forward_tma needs sm_90+ and triton with tl.make_tensor_descriptor "
                           f"(device {x.device}, triton {triton.__version__})")
    if not tma_shapes_ok(a=x, b=weight.t()):
        raise ValueError(f"multi_forward_tma: K and N must be multiples of {16 // x.element_size()} for {x.dtype} "
                         f"(TMA rows of 16 bytes), got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    out = torch.empty((m, weight.shape[0]), device=x.device, dtype=x.dtype)
    if m == 0 or weight.shape[0] == 0:
        return out
    if n == 0 or r_max == 0 or k == 0:  # no adapter term
        return torch.addmm(bias, x, weight.t(), out=out) if bias is not None else torch.mm(x, weight.t(), out=out)
    triton.set_allocator(_allocator(x.device))
    x, w = _with_rows(x), _with_rows(weight)
    la = _with_rows(lora_A_stack.reshape(n * r_max, k))
    if ranks is None:
        ranks = torch.full((n,), r_max, device=x.device, dtype=torch.int32)
    scales = scalings.to(torch.float32)
    u = torch.empty((m, r_max), device=x.device, dtype=torch.float32)
    flags = torch.zeros(triton.cdiv(m, 32), device=x.device, dtype=torch.int32)
    args = (x, w, la, lora_B_stack, ids, ranks, scales, bias if bias is not None else out, u, flags, out,
            m, weight.shape[0], k, r_max, n, triton.next_power_of_2(m),
            x.stride(0), w.stride(0), la.stride(0), *lora_B_stack.stride(), u.stride(0), out.stride(0))
    meta = dict(HAS_BIAS=bias is not None, R_PAD=r_pad(r_max), DOT_PRECISION=_dot_precision(x.dtype),
                UPCAST=_upcast(x.dtype), SCALE_ON_B=lora_B_stack.dtype == torch.float16)
    _run_persistent(_multi_lora_tma_kernel, _tuned_multi, x, m, weight.shape[0], args, meta, config, waits=True)
    return out


def lora_backward_tma(*, dy: torch.Tensor, w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      u: torch.Tensor | None = None, scale: float = 1.0, seed=0, threshold: int = 0,
                      config: dict | None = None) -> tuple:
    """``(dX, v, dB_raw)`` of the LoRA backward's dY side in one persistent TMA kernel, the dY pass fused into
    the dX GEMM: v = dY @ lora_B (M, R) fp32, dX = dY @ w + scale * mask * (v @ lora_A) in dY's dtype, and, with
    ``u`` (the forward's (M, R)), dB_raw = dY^T @ u (N, R) fp32 (times s it is dB; None without u).

    dy (M, N); w (N, K) (W, read in place); lora_A (R, K); lora_B (N, R); the mask of dX's (m, k) is
    ``draw(seed, m * K + k) >= threshold`` (x's dropout mask; none when threshold == 0). The programs holding
    column block 0 of a row block (first in tile order) accumulate that block's v from the dY tiles their K
    loop loads, and with u each dY tile's dY_tile^T u_rows into the block's partial of dB (added over row
    blocks in a fixed order afterwards: no atomics in the sum); they publish v through the block's flag and
    the other tiles wait for it, as in ``lora_forward_tma``. dY is read once for dX, v and dB.
    """
    return _dy_pass(dy, w, lora_A, lora_B, u, scale, seed, threshold, config, "lora_backward_tma")[:3]


def dora_backward_tma(*, dy: torch.Tensor, w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      g: torch.Tensor, u: torch.Tensor | None = None, y: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, scale: float = 1.0, seed=0, threshold: int = 0,
                      config: dict | None = None) -> tuple:
    """``(dX, v, dB_raw, dm_raw)`` of DoRA's plain backward on dY's side, in one kernel as ``lora_backward_tma``,
    with G = dY ⊙ g (g (N,) fp32, G rounded to dY's dtype) in place of dY: dX = G @ w + scale * mask * (v @
    lora_A), v = G @ lora_B (M, R) fp32, with u dB_raw = G^T @ u (N, R) fp32 (times s it is dB), and with the
    output y (M, N) dm_raw = Σ_i dY_i ⊙ (y_i - bias) (N,) fp32 (divided by m it is dm; None without y). G
    never reaches memory: dY's tiles are scaled in registers as they are loaded."""
    if g.shape != (dy.shape[1],) or g.dtype != torch.float32:
        raise ValueError(f"dora_backward_tma: g must be fp32 ({dy.shape[1]},), got {g.dtype} {tuple(g.shape)}")
    if y is not None and y.shape != dy.shape:
        raise ValueError(f"dora_backward_tma: y must be {tuple(dy.shape)} (dY's shape), got {tuple(y.shape)}")
    if y is not None and not dm_pass_fits(dy, w.shape[1], config):
        raise ValueError(f"dora_backward_tma: with y, dX needs at least 2 column blocks (the magnitude's partials "
                         f"are column block 1's work): in_features {w.shape[1]} must be above "
                         f"{_dm_block_n(dy, config)}")
    if not dora_dy_pass_fits(lora_A.shape[0], threshold > 0, fits_itemsize(dy, config), dm_part=y is not None):
        raise ValueError(f"dora_backward_tma: rank {lora_A.shape[0]}{' with the mask' if threshold > 0 else ''}"
                         f"{' and y (the magnitude partials)' if y is not None else ''} in {dy.dtype} is not held by "
                         "its configs (ranks up to 16, without the mask; with y, 16-bit dtypes only)")
    return _dy_pass(dy, w, lora_A, lora_B, u, scale, seed, threshold, config, "dora_backward_tma", g=g, y=y,
                    bias=bias)


def _dy_pass(dy, w, lora_A, lora_B, u, scale, seed, threshold, config, name, g=None, y=None, bias=None) -> tuple:
    """``(dX, v, dB_raw or None, dm_raw or None)`` of ``lora_backward_tma`` / ``dora_backward_tma``."""
    R = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape != (dy.shape[1], R):
        raise ValueError(f"{name}: lora_B must be (N={dy.shape[1]}, R={R}), got {tuple(lora_B.shape)}")
    isz = fits_itemsize(dy, config)
    if not dy_pass_fits(R, threshold > 0, isz):
        limit = _rank_limit(lambda r: dy_pass_fits(r, threshold > 0, isz))
        raise ValueError(f"{name}: rank {R} is above what its configs hold for {dy.dtype} (at most "
                         f"{limit}{' with the mask' if threshold > 0 else ''})")
    v = torch.empty((dy.shape[0], R), device=dy.device, dtype=torch.float32)
    config = _config_for(dy, config)
    rows = triton.cdiv(dy.shape[0], config["BLOCK_M"] if config is not None else _TUNED_BLOCK_M)
    f32 = dict(device=dy.device, dtype=torch.float32)
    # u's rows are read with a unit inner stride (the kernel takes its row stride only)
    db_part = (u if u.stride(-1) == 1 else u.contiguous(), torch.empty((rows, dy.shape[1], R), **f32)) \
        if u is not None else None
    dm_part = None
    if y is not None:  # y is read through dY's descriptor strides: both as standard rows
        dy, y = _with_rows(dy.contiguous()), _with_rows(y.contiguous())
        dm_part = (y, torch.empty((rows, dy.shape[1]), **f32), bias)
    # B^T as (R, N) rows: the descriptor the producers read it through (a copy of N x R elements).
    dx = _launch(dy, w, v, lora_A, None, scale, seed, threshold, config, shrink=(_with_rows(lora_B.t()), 1.0, 0),
                 db_part=db_part, k_scale=g, dm_part=dm_part)
    if dx.numel() == 0:  # no program ran (M or K is 0)
        gdy = dy.float() if g is None else _round_like(dy.float() * g, dy)
        db = gdy.t() @ _round_like(u.float(), dy).float() if u is not None else None
        dm = (dy.float() * (y.float() - (bias.float() if bias is not None else 0.0))).sum(0) if y is not None else None
        return dx, v, db, dm
    # the row blocks' partials, added in a fixed order
    return (dx, v, db_part[1].sum(0) if db_part is not None else None,
            dm_part[1].sum(0) if dm_part is not None else None)


def _round_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).float()


def _config_for(a: torch.Tensor, config: dict | None) -> dict | None:
    """The explicit blocks a launch runs with: ``config`` if given, ``_TEST_CONFIG`` under the interpreter and
    with FASTPEFT_AUTOTUNE=0 (GPU tests), ``pinned_tma`` in deterministic mode; None: autotuned."""
    if config is None and _use_explicit_blocks(a):
        config = _TEST_CONFIG
    if config is None and is_deterministic():
        config = pinned_tma(a.element_size())
    return config


def _launch(a, b, lu, lv, bias, scale, seed, threshold, config, shrink=None, col_scale=None,
            db_part=None, k_scale=None, dm_part=None) -> torch.Tensor:
    """``lora_gemm_tma``, or with ``shrink = (la, shrink_scale, x_threshold)`` the fused shrink writing lu;
    ``col_scale`` g (N,) fp32 scales the columns before the bias (not with the output mask); ``db_part = (pu,
    part)`` (with shrink) also writes part[m] = a[rows of block m]^T @ pu[rows of block m]; ``k_scale`` g (K,)
    fp32 scales a's columns (every product); ``dm_part = (y, part, yb)`` (with shrink) also writes part[m] =
    Σ over block m's rows of a ⊙ (y - yb)."""
    if not tma_supported(a.device):
        raise RuntimeError(f"lora_gemm_tma needs sm_90+ and triton with tl.make_tensor_descriptor "
                           f"(device {a.device}, triton {triton.__version__})")
    if not tma_shapes_ok(a=a, b=b):
        raise ValueError(f"lora_gemm_tma: K and N must be multiples of {16 // a.element_size()} for "
                         f"{a.dtype} (TMA rows of 16 bytes), got a {tuple(a.shape)}, b {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    R = lu.shape[1]
    a = _with_rows(a)
    b_nk, b_arg = _b_operand(b)
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return out
    if shrink is not None and K == 0:
        lu.zero_()
        shrink = None
        for part in (db_part, dm_part):
            if part is not None:
                part[1].zero_()
    triton.set_allocator(_allocator(a.device))
    lv, scale = scale_onto_lv(lv, scale)
    la, shrink_scale, x_thr = shrink if shrink is not None else (out, 1.0, 0)
    # One threshold argument: x's mask (the forward's fused shrink) or the output's (dX), never both.
    assert not (threshold > 0 and x_thr > 0), "x's mask and the output's mask are exclusive"
    # One flag per row block of the smallest BLOCK_M of any config (32), zeroed for each launch.
    flags = torch.zeros(triton.cdiv(M, 32) if shrink is not None else 1, device=a.device, dtype=torch.int32)
    pu, part = db_part if db_part is not None and shrink is not None else (lu, flags)
    y, dm, yb = dm_part if dm_part is not None and shrink is not None else (a, flags, None)
    if col_scale is not None and k_scale is not None:
        raise ValueError("col_scale and k_scale are exclusive (the forward's g and the backward's)")
    g = col_scale if col_scale is not None else k_scale
    args = (a, b_arg, lu, lv, bias if bias is not None else out, out, la, flags,
            g if g is not None else flags, pu, part, y, yb if yb is not None else flags, dm, M, N, K, R,
            triton.next_power_of_2(M),
            a.stride(0), b_arg.stride(0), lu.stride(0), lu.stride(1), lv.stride(0), lv.stride(1), out.stride(0),
            la.stride(0), pu.stride(0), scale, shrink_scale, seed, max(threshold, x_thr))
    meta = dict(HAS_BIAS=bias is not None, HAS_MASK=threshold > 0, B_NK=b_nk, R_PAD=r_pad(R),
                DOT_PRECISION=_dot_precision(a.dtype), UPCAST=_upcast(a.dtype), SHRINK=shrink is not None,
                X_MASK=shrink is not None and x_thr > 0, COL_SCALE=col_scale is not None,
                DB_PART=db_part is not None and shrink is not None, K_SCALE=k_scale is not None,
                DM_PART=dm_part is not None and shrink is not None, DM_BIAS=yb is not None)
    config = _config_for(a, config)
    if config is not None and db_part is not None and db_part[1].shape[0] != triton.cdiv(M, config["BLOCK_M"]):
        raise ValueError(f"dB partials for BLOCK_M {config['BLOCK_M']}: {triton.cdiv(M, config['BLOCK_M'])} row "
                         f"blocks, got {db_part[1].shape[0]}")
    _run_persistent(_lora_gemm_tma_kernel, _tuned, a, M, N, args, meta, config, waits=shrink is not None)
    return out


def _b_operand(b: torch.Tensor) -> tuple:
    """``(B_NK, b_arg)`` for the right operand b (K, N) of a TMA GEMM: its transpose itself where it is (N, K)
    rows (the forward's W), b itself where it is (K, N) rows (dX's W), else a copy as (N, K) rows."""
    bt = b.t()
    if bt.stride(1) == 1 and _rows_ok(bt):
        return True, bt
    if _rows_ok(b):
        return False, b
    return True, _with_rows(bt)


def _run_persistent(kernel, tuned, a: torch.Tensor, M: int, N: int, args: tuple, meta: dict, config: dict | None,
                    waits: bool = False) -> None:
    """Launch a persistent TMA kernel over the cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N) output tiles, at most one
    program per SM: with ``config``'s blocks (``_config_for``), else autotuned (``tuned()``, the kernel's
    autotuner). ``waits``: some programs wait for others' flags, so the interpreter, which runs programs one
    after another, gets a single program walking every tile."""
    tiles = lambda c: triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])  # noqa: E731
    config = _config_for(a, config)
    sms = _sm_count(a.device.index or 0) if a.device.type == "cuda" else 3
    if config is not None:
        cfg = dict(config)
        cfg.setdefault("NUM_SMS", sms)
        if waits and INTERPRET:
            cfg["NUM_SMS"] = 1
        kernel[(max(1, min(cfg["NUM_SMS"], tiles(cfg))),)](*args, **meta, **cfg)
    else:
        tuned()[lambda c: (max(1, min(sms, tiles(c))),)](*args, **meta, NUM_SMS=sms)
