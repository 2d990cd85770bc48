"""Kernels for LoRA over quantized base weights (QLoRA): bitsandbytes NF4 / FP4 (nested absmax or not) and int8.

- ``_dequant_4bit_kernel``: one pass that dequantizes a packed 4-bit weight into a dense (out, in) buffer of
  the compute dtype (the caller's buffer: fastpeft's shared per-device ``workspace``); the large-M forward and
  every backward then run the LoRA GEMM of ``kernels.lora`` on it. Bit-exact with bitsandbytes:
  ``code[nibble] * absmax`` in fp32, rounded once to bnb's dequantized dtype (then to the compute dtype if it
  differs).
- ``_qlora_fused_kernel``: ``out = x deq(W)^T (* row scales) + s * (drop(x) A^T) B^T + bias`` in one kernel,
  for small M (decode, M <= ``FUSED_MAX_M``) with 4-bit weights and at every M with int8 weights (W8A16): the
  W tiles are dequantized in registers inside the K loop (NF4 / FP4 table lookup, nested absmax unpacked
  in-kernel; int8 cast exactly to the compute dtype, its row scales applied in the epilogue), ``x A^T``
  is accumulated in the same loop from the same x tile, and ``s u B^T`` is added in the epilogue; the
  programs of the first column of tiles write ``u`` (fp32) for the backward. Over a dense W in the compute
  dtype (QUANT 2) the same kernel is plain LoRA's forward in one launch at decode sizes (``lora_decode``).

Packed 4-bit layout (bitsandbytes ``quantize_4bit``): element ``e = n * K + k`` of W (N, K) is the high nibble of
byte ``e // 2`` when e is even, the low one when odd; its scale is ``absmax[e // BLOCKSIZE]``, nested:
``code2[absmax_q[i]] * absmax2[i // BLOCKSIZE2] + offset``.

This module imports only torch and triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (_cast, _dot_precision, _keep_mask, _mma, _sm_count, _upcast, _use_explicit_blocks, fit_stages,
                      r_pad)

# bitsandbytes' 1/127 (int8_vectorwise_dequant): W = CB * SCB * INT8_INV_SCALE.
INT8_INV_SCALE = 7.874015718698502e-3
# The fused 4-bit kernel is for decode-like M: above this, one dequant pass + the tensor-core LoRA GEMM wins
# (the fused kernel redoes the NF4 lookups for every M tile). 64 is the bound, not yet measured on a card.
FUSED_MAX_M = 64

_QUANT_CODES = {"nf4": 0, "fp4": 0, "int8": 1}  # 0: 16-entry table lookup, 1: int8 cast (2: dense, lora_decode)


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, idx, ok, NESTED: tl.constexpr,
                 BLOCKSIZE2: tl.constexpr):
    """fp32 scale of quant block ``idx`` (any shape): absmax[idx], or nested code2[q[idx]] * absmax2 + offset."""
    if NESTED:
        q = tl.load(absmax_ptr + idx, mask=ok, other=0).to(tl.int32)
        am = tl.load(code2_ptr + q, mask=ok, other=0.0) * tl.load(absmax2_ptr + idx // BLOCKSIZE2, mask=ok, other=0.0)
        am = am + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + idx, mask=ok, other=0.0)
    return am


@triton.jit
def _round_to_w_dtype(x, W_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x rounded to bnb's dequantized dtype (W_DTYPE: 0 fp32, 1 fp16, 2 bf16), kept as that dtype."""
    if W_DTYPE == 1:
        x = _cast(x, tl.float16, UPCAST)
    elif W_DTYPE == 2:
        x = _cast(x, tl.bfloat16, UPCAST)
    return x


@triton.jit
def _dequant_4bit_kernel(
    # pointers
    data_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
    # sizes: n elements (out * in)
    n,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program: BLOCK packed bytes -> 2 * BLOCK values. Both nibbles of a byte share their quant block
    # (block sizes are even), so one scale load serves two outputs.
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    e = 2 * j
    ok = e < n
    byte = tl.load(data_ptr + j, mask=ok, other=0).to(tl.int32)
    am = _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, e // BLOCKSIZE, ok, NESTED, BLOCKSIZE2)
    hi = tl.load(code_ptr + (byte >> 4)) * am
    lo = tl.load(code_ptr + (byte & 0xF)) * am
    out_ty = out_ptr.dtype.element_ty
    # bnb rounds fp32 to its dequantized dtype; a compute dtype that differs is a second rounding, as
    # dequantize_4bit(...).to(compute_dtype) does.
    hi = _cast(_round_to_w_dtype(hi, W_DTYPE, UPCAST), out_ty, UPCAST)
    lo = _cast(_round_to_w_dtype(lo, W_DTYPE, UPCAST), out_ty, UPCAST)
    tl.store(out_ptr + e, hi, mask=ok)
    tl.store(out_ptr + e + 1, lo, mask=ok & (e + 1 < n))


@triton.jit(do_not_specialize=["seed", "threshold"])
def _qlora_fused_kernel(
    # pointers
    x_ptr, w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, scales_ptr, a_ptr, b_ptr, bias_ptr,
    out_ptr, u_ptr,
    # sizes
    M, N, K, R,
    # strides (stride_wn / stride_wk: W's, for QUANT 1 and 2; the 4-bit layout is bnb's packed one)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_om, stride_on,
    stride_um, stride_ur,
    # LoRA: out += scale * (drop_scale * mask * x) A^T B^T; mask of (m, k) from draw(seed, m * K + k) >= threshold
    scale, drop_scale, seed, threshold,
    # meta-parameters
    QUANT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    W_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, COL_SCALE: tl.constexpr = False,
):
    # COL_SCALE (QUANT 2: DoRA): scales_ptr holds g (N,) fp32, out = g * (x W^T + s u B^T) + bias.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    cdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    rn64 = rn.to(tl.int64)
    # Pointers advanced by BLOCK_K each step (no per-element 64-bit index math in the loop: it spilled).
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    a_ptrs = a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak
    if QUANT == 0:
        # K is a multiple of the block size, hence of BLOCK_K: no K mask. Row n's bytes for k0..k0+BLOCK_K are
        # contiguous (n * K/2 + k0/2 ...), loaded as a (BLOCK_N, BLOCK_K/2) tile and split into nibbles.
        rkh = tl.arange(0, BLOCK_K // 2)
        w_ptrs = w_ptr + rn64[:, None] * (K // 2) + rkh[None, :]
        scale_idx = rn64 * (K // BLOCKSIZE)
    else:
        w_ptrs = w_ptr + rn64[:, None] * stride_wn + rk[None, :] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # W tile (BLOCK_N, BLOCK_K) in W's own row-major order, dequantized in registers; its transpose feeds the dot.
        if QUANT == 0:
            byte = tl.load(w_ptrs, mask=n_ok[:, None], other=0).to(tl.int32)
            nib = tl.interleave(byte >> 4, byte & 0xF)  # high nibble first: element 2j, then 2j + 1
            # BLOCK_K divides BLOCKSIZE (checked by the launcher): the tile's columns of row n share one quant
            # block, so one scale per row.
            am = _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, scale_idx + k0 // BLOCKSIZE, n_ok,
                              NESTED, BLOCKSIZE2)
            w = tl.load(code_ptr + nib) * am[:, None]
            w = _cast(_round_to_w_dtype(w, W_DTYPE, UPCAST), cdt, UPCAST)
            w_ptrs += BLOCK_K // 2
        else:
            # int8 -> compute dtype is exact (|v| <= 127); the row scales wait for the epilogue. (fp32 under
            # UPCAST, where the interpreter's int8 -> bf16 cast is wrong and _mma upcasts anyway.) QUANT 2: W
            # already in the compute dtype (plain LoRA at decode sizes).
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            w = w.to(tl.float32) if UPCAST else w.to(cdt)
            w_ptrs += BLOCK_K * stride_wk
        w = tl.trans(w)
        acc = _mma(x, w, acc, DOT_PRECISION, UPCAST)
        # x A^T from the same x tile (dropout mask redrawn, never stored).
        if HAS_MASK:
            offs = rm[:, None].to(tl.int64) * K + (k0 + rk)[None, :].to(tl.int64)
            x = tl.where(_keep_mask(seed, offs, threshold), x, 0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        u = _mma(x, at, u, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    if QUANT == 1:
        sc = tl.load(scales_ptr + rn, mask=n_ok, other=0.0).to(tl.float32) * 7.874015718698502e-3
        acc = acc * sc[None, :]
    u = u * drop_scale
    if WRITE_U:
        if pid_n == 0:
            tl.store(u_ptr + rm[:, None].to(tl.int64) * stride_um + rr[None, :] * stride_ur, u,
                     mask=m_ok[:, None] & r_ok[None, :])
    bt = tl.load(b_ptr + rr[:, None] * stride_br + rn64[None, :] * stride_bn, mask=r_ok[:, None] & n_ok[None, :],
                 other=0.0)
    low = _mma(_cast(u, cdt, UPCAST), bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, UPCAST)
    acc += low * scale
    if COL_SCALE:
        acc = acc * tl.load(scales_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn64[None, :] * stride_on
    tl.store(out, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------

_W_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Explicit blocks under the interpreter (and FASTPEFT_AUTOTUNE=0); small so that odd shapes cover edges.
_TEST_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "DEQUANT_BLOCK": 64}


def _nested_args(qw):
    if qw.nested:
        return qw.nested_code, qw.nested_absmax, qw.offset, qw.nested_blocksize
    return qw.absmax, qw.absmax, qw.absmax, 256  # unused pointers (NESTED=False)


def dequantize_4bit(qw, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The 4-bit weight of ``qw`` (a ``fastpeft.quant.QuantizedWeight``) as a dense (out, in) tensor of
    ``dtype``, written into ``out`` (a contiguous buffer of ``dtype``, at least out*in elements) or a fresh tensor."""
    n = qw.shape[0] * qw.shape[1]
    out = torch.empty(qw.shape, device=qw.device, dtype=dtype) if out is None else out.view(-1)[:n].view(qw.shape)
    if n == 0:
        return out
    block = _TEST_BLOCKS["DEQUANT_BLOCK"] if _use_explicit_blocks(out) else 1024
    code2, absmax2, offset, bs2 = _nested_args(qw)
    grid = (triton.cdiv(triton.cdiv(n, 2), block),)
    _dequant_4bit_kernel[grid](
        qw.data, qw.code, qw.absmax, code2, absmax2, offset, out, n,
        BLOCKSIZE=qw.blocksize, BLOCKSIZE2=bs2, NESTED=qw.nested, W_DTYPE=_W_DTYPE_CODES[qw.dtype], BLOCK=block,
        UPCAST=_upcast(dtype) or _upcast(qw.dtype), num_warps=4,
    )
    return out


def int8_weight(qw, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 weight cast exactly to ``dtype`` (its row scales not applied), written into ``out`` (as
    ``dequantize_4bit``'s) or a fresh tensor."""
    if out is None:
        return qw.data.to(dtype)
    return out.view(-1)[:qw.shape[0] * qw.shape[1]].view(qw.shape).copy_(qw.data)


def fused_unsupported_reason(qw, M: int) -> str | None:
    """Why the fused kernel cannot run this weight (None when it can). The 4-bit kernel reads one scale per
    row and K tile, so K must be a multiple of the quant block size (and even: two nibbles a byte)."""
    if qw.kind == "int8":
        return None
    K = qw.shape[1]
    if K % qw.blocksize:
        return (f"in_features={K} is not a multiple of the quant block size {qw.blocksize} (the fused 4-bit kernel "
                f"reads one scale per row and K tile)")
    if M > FUSED_MAX_M:
        return f"M={M} rows is above the fused 4-bit kernel's bound FUSED_MAX_M={FUSED_MAX_M}"
    return None


def qlora_fused(x: torch.Tensor, qw, lora_A: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None,
                scale: float, drop_scale: float, seed, threshold: int, write_u: bool = True):
    """``(y, u)``: y = x deq(W)^T + scale * u B^T + bias in x's dtype, u = drop_scale * (mask * x) A^T fp32 (M, r)
    (None unless ``write_u``). x (M, K), lora_A (r, K), lora_B (N, r), any strides; one kernel.
    4-bit weights: raises ``ValueError`` when ``fused_unsupported_reason`` names a reason."""
    M, K = x.shape
    N = qw.shape[0]
    R = lora_A.shape[0]
    if qw.kind != "int8" and K % qw.blocksize:
        raise ValueError(f"qlora_fused: {fused_unsupported_reason(qw, 0)}; use the dequantize + GEMM path")
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, R), device=x.device, dtype=torch.float32) if write_u else out
    if M == 0 or N == 0:
        return out, (u if write_u else None)
    if _use_explicit_blocks(x):
        bm, bn, bk, warps, stages = _TEST_BLOCKS["BLOCK_M"], _TEST_BLOCKS["BLOCK_N"], _TEST_BLOCKS["BLOCK_K"], 4, 1
    elif M <= 16:
        # Decode: bound by reading W, so narrow N tiles give every SM work. Compiled for sm_90 (triton 3.9,
        # bf16, nested NF4 with dropout): 164 / 136 registers at R_PAD 16 / 64, no spills at 8 warps
        # (benchmarks/results/sm90-resources-*.md); 166 / 226 at 4 warps, no spills either.
        bm, bn, bk, warps, stages = 16, 64, 64, 8, 3
    elif qw.kind != "int8":
        # 4-bit, 16 < M <= 64: BLOCK_K=32 keeps the dequantized (64, 32) tile in 128 registers (sm_90, 8 warps).
        bm, bn, bk, warps, stages = 64, 64, 32, 8, 3
    else:
        # int8 at larger M: 168 registers, no spills on sm_90; 64x64x64 at 4 warps spilled 208 bytes.
        bm, bn, bk, warps, stages = 64, 128, 32, 8, 3
    if qw.kind != "int8":
        bk = min(bk, qw.blocksize)
    code2, absmax2, offset, bs2 = _nested_args(qw) if qw.kind != "int8" else (out, out, out, 256)
    _run_fused(x, qw.data, (K, 1), lora_A, lora_B, bias, out, u, scale, drop_scale, seed, threshold, write_u,
               (bm, bn, bk, warps, stages), _QUANT_CODES[qw.kind],
               (qw.code if qw.code is not None else out, qw.absmax if qw.absmax is not None else out, code2, absmax2,
                offset, qw.scales if qw.scales is not None else out),
               NESTED=bool(qw.nested), BLOCKSIZE=max(qw.blocksize, 1), BLOCKSIZE2=bs2,
               W_DTYPE=_W_DTYPE_CODES[qw.dtype] if qw.kind != "int8" else 0,
               UPCAST=_upcast(x.dtype) or _upcast(qw.dtype))
    return out, (u if write_u else None)


def _run_fused(x, w, w_strides, lora_A, lora_B, bias, out, u, scale, drop_scale, seed, threshold, write_u, blocks,
               quant, tables, **meta):
    """Launch ``_qlora_fused_kernel`` over ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); ``tables``:
    the code, absmax, nested code, nested absmax, offset and row-scale pointers (any tensor where unused)."""
    M, K = x.shape
    N, R = out.shape[1], lora_A.shape[0]
    bm, bn, bk, warps, stages = blocks
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _qlora_fused_kernel[grid](
        x, w, *tables, lora_A, lora_B, bias if bias is not None else out, out, u,
        M, N, K, R,
        x.stride(0), x.stride(1), w_strides[0], w_strides[1], lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
        lora_B.stride(1), out.stride(0), out.stride(1), u.stride(0), u.stride(1),
        scale, drop_scale, seed, threshold,
        QUANT=quant, HAS_BIAS=bias is not None, HAS_MASK=threshold > 0, WRITE_U=write_u, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, R_PAD=r_pad(R), DOT_PRECISION=_dot_precision(x.dtype), num_warps=warps, num_stages=stages,
        **meta,
    )


# The dense kernel's rows: decode sizes, where one launch beats the shrink + partial sum + GEMM of the kernel path.
DENSE_MAX_M = 64


def lora_decode(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                bias: torch.Tensor | None, scale: float, drop_scale: float, seed, threshold: int,
                write_u: bool = True, col_scale: torch.Tensor | None = None):
    """``(y, u)`` of plain LoRA in one launch of the fused kernel over a dense W: y = x W^T + scale * u B^T + bias
    in x's dtype, u = drop_scale * (mask * x) A^T fp32 (M, r) (None unless ``write_u``); the mask of x's (m, k)
    is ``draw(seed, m * K + k) >= threshold`` (none at threshold 0), as the shrink kernel draws it. x (M, K),
    weight (N, K) in x's dtype, lora_A (r, K), lora_B (N, r), bias (N,) or None, any strides. ``col_scale``
    (N,) fp32 contiguous or None: DoRA's g, y = g * (x W^T + scale * u B^T) + bias (its plain mode). Every program reads A
    beside its W tiles (from L2 after the first), so the path is for decode sizes (``DENSE_MAX_M``): there it
    is one kernel where the kernel path launches three."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, R), device=x.device, dtype=torch.float32) if write_u else out
    if M == 0 or N == 0:
        return out, (u if write_u else None)
    _run_fused(x, weight, weight.stride(), lora_A, lora_B, bias, out, u, scale, drop_scale, seed, threshold, write_u,
               _dense_blocks(x, N, R), 2, (out,) * 5 + (out if col_scale is None else col_scale,), NESTED=False,
               BLOCKSIZE=1, BLOCKSIZE2=256, W_DTYPE=0, UPCAST=_upcast(x.dtype), COL_SCALE=col_scale is not None)
    return out, (u if write_u else None)


def _dense_blocks(x: torch.Tensor, N: int, R: int) -> tuple:
    """``lora_decode``'s blocks for x (M, K), N outputs and rank R: ``_TEST_BLOCKS`` under explicit blocks,
    else ``dense_blocks`` on x's card."""
    if _use_explicit_blocks(x):
        return _TEST_BLOCKS["BLOCK_M"], _TEST_BLOCKS["BLOCK_N"], _TEST_BLOCKS["BLOCK_K"], 4, 1
    return dense_blocks(x.shape[0], N, r_pad(R), _sm_count(x.device.index or 0), x.element_size())


def dense_blocks(M: int, N: int, rp: int, sms: int, itemsize: int = 2) -> tuple:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)`` of ``lora_decode`` at M rows, N outputs and padded rank
    ``rp`` on a card of ``sms`` SMs. The kernel is bound by reading W: N tiles narrow enough (32 where 64-wide
    ones leave SMs idle) that every SM streams W, deep in K for bytes in flight. Every program also reads A
    (rp x K, from L2): BLOCK_N >= 2 rp keeps that at most half its W tile. Not yet timed on a card; compiled
    for sm_90 without spills (benchmarks/results/sm90-resources-*.md). Stages are cut where x's, W's and A's tiles
    of a K step (``itemsize`` bytes an element) would not fit shared memory: in fp32 from R_PAD 256 (4 stages of
    16 x 128 x 64 there took 307200 B, compiled for sm_90 with triton 3.6), in bf16 at R_PAD 512."""
    bn = max(64 if triton.cdiv(N, 64) >= sms else 32, min(128, 2 * rp))
    if M <= 16:
        bm, bk, warps, stages = (16, 128, 4, 4) if bn <= 64 else (16, 64, 4, 4)
    else:
        bm, bk, warps, stages = (64, 64, 4, 3) if bn <= 64 else (64, 32, 8, 3)
    return bm, bn, bk, warps, fit_stages((bm + bn + rp) * bk * itemsize, stages)
