"""Many LoRA adapters in one batch: grouped shrink / expand kernels over per-row adapter ids.

Row m of x (M, K) uses adapter ``ids[m]`` (-1: none) with its own rank r_a <= r_max, scaling s_a and
dropout rate p_a; the adapters' weights are stacks A (n, r_max, K) and B (n, N, r_max). A fixed number of
launches covers any mix of adapters, with no Python loop over them and no host sync:

- ``group_rows``: torch ops on the device sort the rows by adapter (stable) and cut each adapter's
  segment into blocks of BLOCK_M rows. The block table has the static length ``cdiv(M, BLOCK_M) + n``
  (every adapter wastes at most one partly filled block); the blocks left over are empty (start == end)
  and their programs do nothing.
- ``_multi_shrink_kernel``: ``out[pos] = scale_a * drop_a(src[order[pos]]) @ W_a[:, :r_a]`` for the rows
  of one block of one adapter: the source rows are gathered through the sorted order, the reduction may
  be split into partial sums that are added in a fixed order (no atomics), and rows of W past r_a are
  masked out of the loads. Forward ``u = drop(x) A_a^T``, backward ``v = dY B_a``.
- ``_multi_expand_kernel``: in place ``out[order[pos]] += scale_a * mask * (u[pos] @ W_a[:r_a])``.
  Forward ``y += s_a u B_a^T`` after the base GEMM (cuBLAS), backward ``dX += s_a mask * (v A_a) / (1-p_a)``
  after ``dY W``.
- ``_multi_segment_grad_kernel``: the weight gradients, one program per (adapter, tile of features),
  looping over that adapter's rows between bounds read from the device:
  ``dB_a = s_a dY_a^T u_a`` and ``dA_a^T = s_a drop(x_a)^T v_a / (1-p_a)``; columns r >= r_a are zero.
- ``_multi_bgmv_kernel`` (BGMV, for few rows and no gradient: decode, evaluation): shrink and expand in one
  launch with no grouping at all. Program (m, j) reads a = ids[m], computes
  ``u = s_a drop_a(x_m) A_a^T`` (a GEMV over K in fp32) and adds ``u B_a^T`` to its columns of ``out[m]`` in
  place. Each column program recomputes its row's u (r_a K products, A_a read from L2 after the first), and
  rows of one adapter read its factors each on their own; in exchange a forward is the base GEMM plus this
  one launch, with no host work on the ids. The no-grad forward times it against the grouped kernels.

Layout: ``u`` and ``v`` are (M, r_max) fp32 in *sorted* order (row ``pos`` belongs to original row
``order[pos]``), so that each block reads and writes them contiguously and the segment reduction reads an
adapter's rows as one contiguous range. The dropout mask of element (m, k) of x is that of the
single-adapter kernels, ``_keep_mask(seed, m * K + k, threshold_a)`` (fastpeft.reference.dropout_mask at
rate p_a), redrawn wherever it is needed and never stored.

This module imports only torch, triton and its sibling ``_common``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._common import (_HAS_TRITON_OP, _cast, _dot_precision, _keep_mask, _library_op, _mma, _op_body, _seed,
                      _sm_count, _upcast, _use_explicit_blocks, _wrap, block_setter, eager_or_op, narrow_blocks, r_pad,
                      split_chunk, split_count)

# ----------------------------------------------------------------------------------------------------
# grouping: rows sorted by adapter, cut into blocks, all on the device
# ----------------------------------------------------------------------------------------------------


def num_blocks(m: int, n: int, block_m: int) -> int:
    """Static length of the block table: enough for any split of m rows among n adapters."""
    return triton.cdiv(int(m), int(block_m)) + int(n)


def group_rows(ids: torch.Tensor, n: int, block_m: int) -> tuple:
    """Sort rows by adapter and cut the segments into blocks, with torch ops only (no host sync).

    ids: (M,) int64 in [-1, n). Returns
      order  (M,) int64: sorted position -> original row (stable: rows of one adapter keep their order,
             the -1 rows come first);
      bounds (n + 1,) int32: adapter a owns sorted positions [bounds[a], bounds[a + 1]); bounds[n] = M;
      blocks (3, T) int32, T = cdiv(M, block_m) + n: per block its adapter, first sorted position and
             the end of its adapter's segment. Blocks are in adapter order; the T - sum_a cdiv(count_a,
             block_m) left over belong to a dummy "skip" adapter and are stored as adapter 0 with
             start == end == M (no rows).
    Every shape depends on M, n and block_m only.

    Counts come from ``searchsorted`` on the sorted ids rather than ``bincount``, whose output length
    reads max(ids) on the host (a sync on CUDA); the block map is a ``repeat_interleave`` with a static
    ``output_size``, which needs no sync either.
    """
    m = ids.shape[0]
    t = num_blocks(m, n, block_m)
    dev = ids.device
    # Every op is a launch (cudaLaunchKernel took ~14 us of host time on the H200 machine we measured),
    # and eager decode steps are bound by them: keep the ops few.
    sorted_ids, order = torch.sort(ids, stable=True)
    # bounds[a] = first sorted position of adapter a for a = 0..n+1; with every id < n, bounds[n] =
    # bounds[n + 1] = M, so the dummy adapter n has the empty segment [M, M). The -1 rows come first.
    bounds = torch.searchsorted(sorted_ids, torch.arange(n + 2, device=dev, dtype=sorted_ids.dtype))
    nblk = torch.div(bounds.diff() + (block_m - 1), block_m, rounding_mode="floor")  # blocks per adapter
    # first_blk[a] = index of adapter a's first block (exclusive prefix sum); the dummy takes the rest.
    first_blk = torch.cumsum(torch.nn.functional.pad(nblk[:n], (1, 0)), 0)           # (n + 1,)
    reps = torch.cat([nblk[:n], (t - first_blk[n]).reshape(1)])
    adapter = torch.repeat_interleave(torch.arange(n + 1, device=dev), reps, output_size=t)
    j = torch.arange(t, device=dev) - first_blk[adapter]                              # block index in its segment
    end = bounds[adapter + 1]
    start = torch.minimum(bounds[adapter] + j * block_m, end)
    # The dummy's blocks (start == end == M) are stored as adapter 0, so kernels index valid adapters.
    blocks = torch.stack([adapter.masked_fill(adapter == n, 0), start, end]).to(torch.int32)
    return order, bounds[: n + 1].to(torch.int32), blocks


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _block_rows(blocks_ptr, order_ptr, T, BLOCK_M: tl.constexpr):
    """``(adapter, start, end, pos, m_ok, rows)`` of this program's row block (program id 0 of T): its adapter,
    its positions [start, end) in the adapter-sorted order (pos, m_ok: BLOCK_M of them, which are in), and
    the original row of each position (int64)."""
    pid = tl.program_id(0)
    adapter = tl.load(blocks_ptr + pid)
    start = tl.load(blocks_ptr + T + pid)
    end = tl.load(blocks_ptr + 2 * T + pid)
    pos = start + tl.arange(0, BLOCK_M)
    m_ok = pos < end
    return adapter, start, end, pos, m_ok, tl.load(order_ptr + pos, mask=m_ok, other=0).to(tl.int64)


@triton.jit(do_not_specialize=["seed"])
def _multi_shrink_kernel(
    # pointers: src (M, Q); w (n, Q, R) stack; out (S, M, R) fp32; order (M,); blocks (3, T);
    # per-adapter ranks, scales (fp32) and dropout thresholds (int64)
    src_ptr, w_ptr, out_ptr, order_ptr, blocks_ptr, ranks_ptr, scales_ptr, thr_ptr,
    # sizes
    Q, R, q_per_split, T,
    # strides
    stride_sm, stride_sq, stride_wa, stride_wq, stride_wr, stride_os, stride_op, stride_or,
    # dropout: element (m, q) of src is masked by draw(seed, m * mask_sm + q * mask_sq) >= thr[a]
    seed, mask_sm, mask_sq,
    # meta-parameters
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_s = tl.program_id(1)
    adapter, start, end, pos, m_ok, rows = _block_rows(blocks_ptr, order_ptr, T, BLOCK_M)
    # Rank masking in the loads: a rank-r_a adapter reads r_a columns of its W, whatever r_max is.
    rank = tl.load(ranks_ptr + adapter)
    rr = tl.arange(0, R_PAD)
    r_ok = rr < rank
    q_start = pid_s * q_per_split
    q_end = tl.minimum(q_start + q_per_split, Q)
    q_end = tl.where(end > start, q_end, q_start)  # empty (skip) block: no iterations
    w_base = w_ptr + adapter.to(tl.int64) * stride_wa
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        q_ok = rq < q_end
        a = tl.load(src_ptr + rows[:, None] * stride_sm + rq[None, :].to(tl.int64) * stride_sq,
                    mask=m_ok[:, None] & q_ok[None, :], other=0.0)
        if HAS_MASK:
            offs = rows[:, None] * mask_sm + rq[None, :].to(tl.int64) * mask_sq
            a = tl.where(_keep_mask(seed, offs, tl.load(thr_ptr + adapter)), a, 0.0)
        b = tl.load(w_base + rq[:, None].to(tl.int64) * stride_wq + rr[None, :] * stride_wr,
                    mask=q_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _mma(a, _cast(b, a.dtype, UPCAST), acc, DOT_PRECISION, UPCAST)
    acc = acc * tl.load(scales_ptr + adapter)
    out = out_ptr + pid_s.to(tl.int64) * stride_os + pos[:, None].to(tl.int64) * stride_op + rr[None, :] * stride_or
    tl.store(out, acc, mask=m_ok[:, None] & (rr < R)[None, :])


@triton.jit(do_not_specialize=["seed"])
def _multi_expand_kernel(
    # pointers: out (M, N) updated in place; u (M, R) fp32 in sorted order; w (n, R, N) stack; order;
    # blocks; per-adapter ranks, scales (fp32) and dropout thresholds (int64)
    out_ptr, u_ptr, w_ptr, order_ptr, blocks_ptr, ranks_ptr, scales_ptr, thr_ptr,
    # sizes
    N, T,
    # strides
    stride_om, stride_on, stride_um, stride_ur, stride_wa, stride_wr, stride_wn,
    # out[m] += scale[a] * mask * (u @ w_a), mask of (m, n) from draw(seed, m * mask_sm + n * mask_sn) >= thr[a]
    seed, mask_sm, mask_sn,
    # meta-parameters
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    adapter, start, end, pos, m_ok, rows = _block_rows(blocks_ptr, order_ptr, T, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rank = tl.where(end > start, tl.load(ranks_ptr + adapter), 0)  # empty block: no loads of w
    rr = tl.arange(0, R_PAD)
    r_ok = rr < rank
    lu = tl.load(u_ptr + pos[:, None].to(tl.int64) * stride_um + rr[None, :] * stride_ur,
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    w_base = w_ptr + adapter.to(tl.int64) * stride_wa
    lv = tl.load(w_base + rr[:, None] * stride_wr + rn[None, :].to(tl.int64) * stride_wn,
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    low = _mma(_cast(lu, lv.dtype, UPCAST), lv, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION,
               UPCAST)
    if HAS_MASK:
        offs = rows[:, None] * mask_sm + rn[None, :].to(tl.int64) * mask_sn
        low = tl.where(_keep_mask(seed, offs, tl.load(thr_ptr + adapter)), low, 0.0)
    ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :].to(tl.int64) * stride_on
    ok = m_ok[:, None] & n_ok[None, :]
    cur = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, _cast(cur + low * tl.load(scales_ptr + adapter), out_ptr.dtype.element_ty, UPCAST), mask=ok)


@triton.jit(do_not_specialize=["seed"])
def _multi_segment_grad_kernel(
    # pointers: src (M, P) original order; g (M, R) fp32 sorted order; out (S, n, P, R) by strides;
    # order; bounds (n + 1,); per-adapter ranks, scales (fp32) and dropout thresholds (int64)
    src_ptr, g_ptr, out_ptr, order_ptr, bounds_ptr, ranks_ptr, scales_ptr, thr_ptr,
    # sizes (SPLIT: how many partial sums each adapter's rows are cut into)
    P, R, SPLIT,
    # strides
    stride_sm, stride_sp, stride_gm, stride_gr, stride_os, stride_oa, stride_op, stride_or,
    # dropout: element (m, p) of src is masked by draw(seed, m * mask_sm + p * mask_sp) >= thr[a]
    seed, mask_sm, mask_sp,
    # meta-parameters
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # out[s, a, p, r] = scale[a] * sum over this split's rows of adapter a of drop(src)[m, p] * g[pos, r]
    adapter = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_s = tl.program_id(2)
    seg_lo = tl.load(bounds_ptr + adapter)
    seg_hi = tl.load(bounds_ptr + adapter + 1)
    chunk = tl.cdiv(tl.cdiv(seg_hi - seg_lo, SPLIT), BLOCK_M) * BLOCK_M
    lo = seg_lo + pid_s * chunk
    hi = tl.minimum(lo + chunk, seg_hi)
    rank = tl.load(ranks_ptr + adapter)
    rr = tl.arange(0, R_PAD)
    r_ok = rr < rank
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = rp < P
    acc = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        m_ok = pos < hi
        rows = tl.load(order_ptr + pos, mask=m_ok, other=0).to(tl.int64)
        s = tl.load(src_ptr + rows[None, :] * stride_sm + rp[:, None].to(tl.int64) * stride_sp,
                    mask=p_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_M): src^T
        if HAS_MASK:
            offs = rows[None, :] * mask_sm + rp[:, None].to(tl.int64) * mask_sp
            s = tl.where(_keep_mask(seed, offs, tl.load(thr_ptr + adapter)), s, 0.0)
        g = tl.load(g_ptr + pos[:, None].to(tl.int64) * stride_gm + rr[None, :] * stride_gr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _mma(s, _cast(g, s.dtype, UPCAST), acc, DOT_PRECISION, UPCAST)
    # Padded ranks get exact zeros (also where src holds inf/nan, which 0 * inf would turn into nan).
    acc = tl.where(r_ok[None, :], acc * tl.load(scales_ptr + adapter), 0.0)
    out = (out_ptr + pid_s.to(tl.int64) * stride_os + adapter.to(tl.int64) * stride_oa
           + rp[:, None].to(tl.int64) * stride_op + rr[None, :] * stride_or)
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=p_ok[:, None] & (rr < R)[None, :])


@triton.jit(do_not_specialize=["seed"])
def _multi_bgmv_kernel(
    # pointers: out (M, N) updated in place; x (M, K); a (n, R, K) and b (n, N, R) stacks; ids (M,); per-adapter
    # ranks (int32 or int64), scales (fp32: s_a, times 1/(1-p_a) with dropout) and dropout thresholds (int64)
    out_ptr, x_ptr, a_ptr, b_ptr, ids_ptr, ranks_ptr, scales_ptr, thr_ptr,
    # sizes (n_per_prog: columns of out per program, a multiple of BLOCK_N)
    K, N, n_adapters, n_per_prog,
    # strides
    stride_om, stride_on, stride_xm, stride_xk, stride_aa, stride_ar, stride_ak, stride_ba, stride_bn, stride_br,
    # dropout: element (m, k) of x is masked by draw(seed, m * mask_sm + k * mask_sk) >= thr[a]
    seed, mask_sm, mask_sk,
    # meta-parameters
    HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # out[m, cols] += scale[a] * (drop_a(x[m]) @ a[a, :r_a]^T) @ b[a, cols, :r_a]^T, a = ids[m]; nothing for an
    # id outside [0, n) (-1: base only). GEMVs as products and sums in fp32, no tl.dot: any M, any rank.
    m = tl.program_id(0).to(tl.int64)
    adapter = tl.load(ids_ptr + m).to(tl.int64)
    valid = (adapter >= 0) & (adapter < n_adapters)
    adapter = tl.where(valid, adapter, 0)
    # Rank masking in the loads: a rank-r_a adapter reads r_a rows of A_a and columns of B_a, whatever R is.
    rank = tl.where(valid, tl.load(ranks_ptr + adapter).to(tl.int32), 0)
    rr = tl.arange(0, R_PAD)
    r_ok = rr < rank
    k_end = tl.where(valid, K, 0)  # no adapter: no iterations, no loads of the stacks
    a_base = a_ptr + adapter * stride_aa
    # shrink: acc[r, k] sums x[m, k] * A_a[r, k] over the K chunks; one reduction over k at the end
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    if HAS_MASK:
        thr = tl.load(thr_ptr + adapter)
    for k0 in range(0, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xk = tl.load(x_ptr + m * stride_xm + rk.to(tl.int64) * stride_xk, mask=k_ok, other=0.0)
        if HAS_MASK:
            xk = tl.where(_keep_mask(seed, m * mask_sm + rk.to(tl.int64) * mask_sk, thr), xk, 0.0)
        ak = tl.load(a_base + rr[:, None] * stride_ar + rk[None, :].to(tl.int64) * stride_ak,
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += ak.to(tl.float32) * xk.to(tl.float32)[None, :]
    # (R_PAD,) fp32; exact zeros past r_a (also where x holds an inf, which the masked 0s of A turn into nan)
    u = tl.where(r_ok, tl.sum(acc, axis=1) * tl.load(scales_ptr + adapter), 0.0)
    # expand: this program's columns, BLOCK_N at a time
    n_lo = tl.program_id(1) * n_per_prog
    n_hi = tl.where(valid, tl.minimum(n_lo + n_per_prog, N), n_lo)
    b_base = b_ptr + adapter * stride_ba
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_hi
        bn = tl.load(b_base + rn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        low = tl.sum(bn.to(tl.float32) * u[None, :], axis=1)  # (BLOCK_N,)
        ptrs = out_ptr + m * stride_om + rn.to(tl.int64) * stride_on
        cur = tl.load(ptrs, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(ptrs, _cast(cur + low, out_ptr.dtype.element_ty, UPCAST), mask=n_ok)


# ----------------------------------------------------------------------------------------------------
# block sizes
# ----------------------------------------------------------------------------------------------------

# Explicit blocks for the interpreter and for FASTPEFT_AUTOTUNE=0 (overridable with set_test_blocks):
# the smallest tl.dot sizes, so that the small odd test shapes put several blocks in every adapter's
# segment and cross block edges in every dimension.
_TEST_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_Q": 32, "BLOCK_P": 32, "BLOCK_MR": 16,
                # BGMV: K and N chunks of 32, each program two N chunks (its loop runs twice; odd N leaves a
                # partial chunk and a partial program)
                "BGMV_K": 32, "BGMV_N": 32, "BGMV_N_CHUNKS": 2}


set_test_blocks = block_setter(_TEST_BLOCKS)


def block_m_for(x: torch.Tensor, m: int, n: int) -> int:
    """Rows per block of the grouping (the shrink's and the expand's BLOCK_M).

    Each adapter's last block is partly filled, so blocks should not outgrow the average segment: the
    average rows per adapter rounded up to a power of two, between 16 (tl.dot's smallest M) and 64
    (the (BLOCK_M, R_PAD) fp32 accumulator stays in registers up to R_PAD=128). Heuristic, not measured
    on a GPU.
    """
    if _use_explicit_blocks(x):
        return _TEST_BLOCKS["BLOCK_M"]
    return max(16, min(64, triton.next_power_of_2(triton.cdiv(max(int(m), 1), max(int(n), 1)))))


def bgmv_tile(rp: int) -> tuple:
    """``(chunk, num_warps)`` of the BGMV kernel on CUDA at R_PAD ``rp``: BLOCK_K = BLOCK_N = chunk.

    The loads of a K chunk are not software-pipelined (triton pipelines only loads that feed tl.dot: no
    cp.async in the sm_90 PTX at any num_stages), so each chunk of the shrink waits out a memory latency and
    the row's K / BLOCK_K chunks run one after the other: chunks are large, (R_PAD, BLOCK_K) = 8192 elements
    (8192 // R_PAD between 32 and 512) over 8 warps: 74-87 registers on sm_90 at R_PAD 16..128, bf16, no spill
    (16384 elements took 161). Not measured on a GPU.
    """
    return max(32, min(512, 8192 // rp)), 8


def bgmv_blocks(x: torch.Tensor, m: int, n_out: int, r: int) -> tuple:
    """``(BLOCK_K, BLOCK_N, n_per_prog, num_warps)`` of the BGMV kernel for m rows, n_out columns, rank stack r.

    Chunks and warps from ``bgmv_tile``. Each program covers ``n_per_prog`` columns: enough column programs
    that the grid has about 2 programs per SM (each recomputes its row's u, so no more than that), at least
    one chunk each. Heuristic, not measured on a GPU.
    """
    if _use_explicit_blocks(x):
        bn = _TEST_BLOCKS["BGMV_N"]
        return _TEST_BLOCKS["BGMV_K"], bn, bn * _TEST_BLOCKS["BGMV_N_CHUNKS"], 4
    chunk, warps = bgmv_tile(r_pad(r))
    chunks = triton.cdiv(max(int(n_out), 1), chunk)
    col_progs = max(1, min(chunks, triton.cdiv(2 * _sm_count(x.device.index or 0), max(int(m), 1))))
    return chunk, chunk, triton.cdiv(chunks, col_progs) * chunk, warps


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


def multi_lora_shrink(src: torch.Tensor, w: torch.Tensor, order: torch.Tensor, blocks: torch.Tensor,
                      ranks: torch.Tensor, scales: torch.Tensor, thresholds: torch.Tensor, block_m: int, seed: int = 0,
                      has_mask: bool = False, mask_sm: int = 0, mask_sq: int = 0) -> torch.Tensor:
    """(M, R) fp32 in sorted order: row pos = ``scales[a] * drop_a(src[order[pos]]) @ w[a][:, :ranks[a]]``.

    src (M, Q) any strides; w (n, Q, R) any strides; order / blocks from ``group_rows(ids, n, block_m)``;
    ranks (n,) int32, scales (n,) fp32, thresholds (n,) int64. Columns >= ranks[a] are 0, and so are the
    rows of the -1 positions. With ``has_mask``, element (m, q) of src is kept when
    ``draw(seed, m * mask_sm + q * mask_sq) >= thresholds[a]`` (the defaults: no dropout).
    """
    M, Q = src.shape
    n, _, R = w.shape
    T = blocks.shape[1]
    if _use_explicit_blocks(src):
        block_q, warps, stages = _TEST_BLOCKS["BLOCK_Q"], 4, 1
    else:
        # BLOCK_Q=64, 3 stages: as the single-adapter shrink, a narrow GEMM bound by reading src; not
        # measured on a GPU. Fewer stages where the tiles would not fit shared memory (fp32 from R_PAD 256).
        warps = 4
        block_q, stages = narrow_blocks(block_m, r_pad(R), src.element_size(), w.element_size())
    q_per_split, split = split_chunk(Q, split_count(src, T, Q, block_q), block_q)
    # Zeros: the -1 rows have no block, and u is saved for backward (no uninitialised memory in it).
    out = torch.zeros((split, M, R), device=src.device, dtype=torch.float32)
    if M == 0 or R == 0 or Q == 0 or n == 0:
        return out.sum(0)
    _wrap(_multi_shrink_kernel)[(T, split)](
        src, w, out, order, blocks, ranks, scales, thresholds,
        Q, R, q_per_split, T,
        src.stride(0), src.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        out.stride(2),
        seed, mask_sm, mask_sq,
        HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_Q=block_q, R_PAD=r_pad(R),
        DOT_PRECISION=_dot_precision(src.dtype), UPCAST=_upcast(src.dtype), num_warps=warps, num_stages=stages,
    )
    # Partials are added in a fixed order: deterministic, no atomics.
    return out[0] if split == 1 else out.sum(0)


def multi_lora_expand_(out: torch.Tensor, u: torch.Tensor, w: torch.Tensor, order: torch.Tensor,
                       blocks: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, thresholds: torch.Tensor,
                       block_m: int, seed: int = 0, has_mask: bool = False, mask_sm: int = 0,
                       mask_sn: int = 0) -> torch.Tensor:
    """In place ``out[order[pos]] += scales[a] * mask * (u[pos, :r_a] @ w[a][:r_a])``; returns out.

    out (M, N); u (M, R) sorted order (fp32 or out's dtype); w (n, R, N) any strides. With ``has_mask``,
    element (m, n) of the update is kept when ``draw(seed, m * mask_sm + n * mask_sn) >= thresholds[a]``.
    Rows of adapter -1 are left as they are.
    """
    M, N = out.shape
    n, R, _ = w.shape
    T = blocks.shape[1]
    if M == 0 or N == 0 or R == 0 or n == 0:
        return out
    if _use_explicit_blocks(out):
        block_n = _TEST_BLOCKS["BLOCK_N"]
    else:
        # The (R_PAD, BLOCK_N) tile of w is loaded whole: 128 columns up to R_PAD=64, fewer beyond, to
        # bound shared memory. Not measured on a GPU.
        block_n = 128 if r_pad(R) <= 64 else 64
    _wrap(_multi_expand_kernel)[(T, triton.cdiv(N, block_n))](
        out, u, w, order, blocks, ranks, scales, thresholds,
        N, T,
        out.stride(0), out.stride(1), u.stride(0), u.stride(1), w.stride(0), w.stride(1), w.stride(2),
        seed, mask_sm, mask_sn,
        HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n, R_PAD=r_pad(R),
        DOT_PRECISION=_dot_precision(out.dtype), UPCAST=_upcast(out.dtype), num_warps=4, num_stages=1,
    )
    return out


def multi_lora_segment_grad(src: torch.Tensor, g: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor,
                            ranks: torch.Tensor, scales: torch.Tensor, thresholds: torch.Tensor, seed: int = 0,
                            has_mask: bool = False, mask_sm: int = 0, mask_sp: int = 0,
                            r_major: bool = False) -> torch.Tensor:
    """Per-adapter ``scales[a] * drop_a(src[rows of a])^T @ g[rows of a][:, :r_a]`` in src's dtype.

    src (M, P) original order, any strides; g (M, R) fp32 sorted order; bounds (n + 1,) from
    ``group_rows``. Returns (n, P, R), or (n, R, P) (the same numbers transposed) when ``r_major``;
    entries r >= ranks[a] are exactly 0, and so is every entry of an adapter without rows.
    """
    M, P = src.shape
    R = g.shape[1]
    n = bounds.shape[0] - 1
    shape = (n, R, P) if r_major else (n, P, R)
    if n == 0 or P == 0 or R == 0 or M == 0:
        return src.new_zeros(shape)
    if _use_explicit_blocks(src):
        block_p, block_mr, warps, stages = _TEST_BLOCKS["BLOCK_P"], _TEST_BLOCKS["BLOCK_MR"], 4, 1
    else:
        # BLOCK_P=64 with 32 rows a step: the (BLOCK_P, R_PAD) fp32 accumulator and a (64, 32) tile of
        # src per stage; not measured on a GPU.
        block_p, block_mr, warps, stages = 64, 32, 4, 3
    programs = n * triton.cdiv(P, block_p)
    # Split over each adapter's rows where there are too few (adapter, feature-tile) programs, e.g. one
    # adapter over many tokens. The partial buffer stays small: split is about 2 * SMs / programs.
    split = split_count(src, programs, M, block_mr)
    part = torch.empty((split,) + shape, device=src.device, dtype=src.dtype if split == 1 else torch.float32)
    so, sa = part.stride(0), part.stride(1)
    sp, sr = (part.stride(3), part.stride(2)) if r_major else (part.stride(2), part.stride(3))
    _wrap(_multi_segment_grad_kernel)[(n, triton.cdiv(P, block_p), split)](
        src, g, part, order, bounds, ranks, scales, thresholds,
        P, R, split,
        src.stride(0), src.stride(1), g.stride(0), g.stride(1), so, sa, sp, sr,
        seed, mask_sm, mask_sp,
        HAS_MASK=has_mask, BLOCK_M=block_mr, BLOCK_P=block_p, R_PAD=r_pad(R),
        DOT_PRECISION=_dot_precision(src.dtype), UPCAST=_upcast(src.dtype), num_warps=warps, num_stages=stages,
    )
    # Partials are added in a fixed order: deterministic, no atomics.
    return part[0] if split == 1 else part.sum(0).to(src.dtype)


def multi_lora_bgmv_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor,
                     ranks: torch.Tensor, scales: torch.Tensor, thresholds: torch.Tensor, seed: int = 0,
                     has_mask: bool = False, mask_sm: int = 0, mask_sk: int = 0) -> torch.Tensor:
    """In place ``out[m] += scales[i] * (drop_i(x[m]) @ a[i, :r_i]^T) @ b[i, :, :r_i]^T`` with i = ids[m]; returns
    out. One launch, no grouping, no host sync: the low-rank half of a many-adapter forward at decode sizes.

    out (M, N), x (M, K), a (n, R, K), b (n, N, R), any strides; ids (M,) int32/int64, rows whose id is outside
    [0, n) (-1: base only) are left as they are; ranks (n,) int32/int64 in [1, R]; scales (n,) fp32 (s_i, times
    1/(1-p_i) with dropout); thresholds (n,) int64 (read only with ``has_mask``, any tensor otherwise). With
    ``has_mask`` element (m, k) of x is kept when ``draw(seed, m * mask_sm + k * mask_sk) >= thresholds[i]``:
    with mask_sm = K, mask_sk = 1 that is the grouped shrink's mask (``multi_lora_shrink``), and
    fastpeft.reference.dropout_mask's at row m's rate.
    """
    if out.dim() != 2 or x.dim() != 2 or a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"multi_lora_bgmv_: out, x must be 2-D and a, b 3-D, got out {tuple(out.shape)}, "
                         f"x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}")
    M, K = x.shape
    n, R, _ = a.shape
    N = out.shape[1]
    if out.shape[0] != M or a.shape[2] != K or tuple(b.shape) != (n, N, R):
        raise ValueError(f"multi_lora_bgmv_: shapes do not agree: out {tuple(out.shape)} (M, N), x {tuple(x.shape)} "
                         f"(M, K), a {tuple(a.shape)} (n, R, K), b {tuple(b.shape)} (n, N, R)")
    for name, t, dtypes in (("ids", ids, (torch.int32, torch.int64)), ("ranks", ranks, (torch.int32, torch.int64)),
                            ("scales", scales, (torch.float32,)), ("thresholds", thresholds, (torch.int64,))):
        if name == "thresholds" and not has_mask:
            continue  # not read: any tensor will do
        want = (M,) if name == "ids" else (n,)
        if tuple(t.shape) != want or t.dtype not in dtypes:
            raise ValueError(f"multi_lora_bgmv_: {name} must be {want} of dtype {' or '.join(map(str, dtypes))}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if M == 0 or N == 0 or n == 0 or R == 0:
        return out
    block_k, block_n, n_per_prog, warps = bgmv_blocks(x, M, N, R)
    _wrap(_multi_bgmv_kernel)[(M, triton.cdiv(N, n_per_prog))](
        out, x, a, b, ids, ranks, scales, thresholds,
        K, N, n, n_per_prog,
        out.stride(0), out.stride(1), x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), b.stride(0),
        b.stride(1), b.stride(2),
        seed, mask_sm, mask_sk,
        HAS_MASK=has_mask, BLOCK_K=block_k, BLOCK_N=block_n, R_PAD=r_pad(R), UPCAST=_upcast(out.dtype),
        num_warps=warps, num_stages=1,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# torch.library registration: torch.compile(fullgraph=True) traces these ops and the kernels inside.
# ----------------------------------------------------------------------------------------------------

if _HAS_TRITON_OP:
    # seed_t: a seed drawn inside a compiled region, as a tensor (see _common.eager_or_op).
    @_library_op("fastpeft::multi_lora_shrink", mutates_args=())
    def _multi_lora_shrink_op(src: torch.Tensor, w: torch.Tensor, order: torch.Tensor, blocks: torch.Tensor,
                              ranks: torch.Tensor, scales: torch.Tensor, thresholds: torch.Tensor, block_m: int,
                              seed: int, has_mask: bool, mask_sm: int, mask_sq: int,
                              seed_t: torch.Tensor | None = None) -> torch.Tensor:
        with _op_body():
            return multi_lora_shrink(src, w, order, blocks, ranks, scales, thresholds, block_m, _seed(seed, seed_t),
                                     has_mask, mask_sm, mask_sq)

    @_library_op("fastpeft::multi_lora_expand_", mutates_args=("out",))
    def _multi_lora_expand_op(out: torch.Tensor, u: torch.Tensor, w: torch.Tensor, order: torch.Tensor,
                              blocks: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                              thresholds: torch.Tensor, block_m: int, seed: int, has_mask: bool, mask_sm: int,
                              mask_sn: int, seed_t: torch.Tensor | None = None) -> None:
        with _op_body():
            multi_lora_expand_(out, u, w, order, blocks, ranks, scales, thresholds, block_m, _seed(seed, seed_t),
                               has_mask, mask_sm, mask_sn)

    @_library_op("fastpeft::multi_lora_segment_grad", mutates_args=())
    def _multi_lora_segment_grad_op(src: torch.Tensor, g: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor,
                                    ranks: torch.Tensor, scales: torch.Tensor, thresholds: torch.Tensor, seed: int,
                                    has_mask: bool, mask_sm: int, mask_sp: int, r_major: bool,
                                    seed_t: torch.Tensor | None = None) -> torch.Tensor:
        with _op_body():
            return multi_lora_segment_grad(src, g, order, bounds, ranks, scales, thresholds, _seed(seed, seed_t),
                                           has_mask, mask_sm, mask_sp, r_major)

    @_library_op("fastpeft::multi_lora_bgmv_", mutates_args=("out",))
    def _multi_lora_bgmv_op(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor,
                            ranks: torch.Tensor, scales: torch.Tensor, thresholds: torch.Tensor, seed: int,
                            has_mask: bool, mask_sm: int, mask_sk: int, seed_t: torch.Tensor | None = None) -> None:
        with _op_body():
            multi_lora_bgmv_(out, x, a, b, ids, ranks, scales, thresholds, _seed(seed, seed_t), has_mask, mask_sm,
                             mask_sk)

    # As in lora.py: under TRITON_INTERPRET the kernels would run on fake tensors, so the fakes are
    # given explicitly (shapes only); on GPUs triton_op derives them by tracing the launchers.
    if INTERPRET:
        @_multi_lora_shrink_op.register_fake
        def _(src, w, order, blocks, ranks, scales, thresholds, block_m, seed, has_mask, mask_sm, mask_sq,
              seed_t=None):
            return src.new_empty((src.shape[0], w.shape[2]), dtype=torch.float32)

        @_multi_lora_expand_op.register_fake
        def _(out, u, w, order, blocks, ranks, scales, thresholds, block_m, seed, has_mask, mask_sm, mask_sn,
              seed_t=None):
            return None

        @_multi_lora_bgmv_op.register_fake
        def _(out, x, a, b, ids, ranks, scales, thresholds, seed, has_mask, mask_sm, mask_sk, seed_t=None):
            return None

        @_multi_lora_segment_grad_op.register_fake
        def _(src, g, order, bounds, ranks, scales, thresholds, seed, has_mask, mask_sm, mask_sp, r_major,
              seed_t=None):
            n, p, r = bounds.shape[0] - 1, src.shape[1], g.shape[1]
            return src.new_empty((n, r, p) if r_major else (n, p, r))

    def _expand_registered(out, u, w, order, blocks, ranks, scales, thresholds, block_m, seed, has_mask, mask_sm,
                           mask_sn, seed_t=None):
        torch.ops.fastpeft.multi_lora_expand_(out, u, w, order, blocks, ranks, scales, thresholds, block_m, seed,
                                              has_mask, mask_sm, mask_sn, seed_t=seed_t)
        return out

    def _bgmv_registered(out, x, a, b, ids, ranks, scales, thresholds, seed, has_mask, mask_sm, mask_sk,
                         seed_t=None):
        torch.ops.fastpeft.multi_lora_bgmv_(out, x, a, b, ids, ranks, scales, thresholds, seed, has_mask, mask_sm,
                                            mask_sk, seed_t=seed_t)
        return out

    # Eager calls launch directly (see _common.eager_or_op); torch.compile traces the registered ops.
    shrink_op = eager_or_op(multi_lora_shrink, torch.ops.fastpeft.multi_lora_shrink)
    segment_grad_op = eager_or_op(multi_lora_segment_grad, torch.ops.fastpeft.multi_lora_segment_grad)
    expand_op = eager_or_op(multi_lora_expand_, _expand_registered)
    bgmv_op = eager_or_op(multi_lora_bgmv_, _bgmv_registered)
else:  # torch < 2.6: plain launchers (eager only)
    shrink_op, expand_op, segment_grad_op = multi_lora_shrink, multi_lora_expand_, multi_lora_segment_grad
    bgmv_op = multi_lora_bgmv_
