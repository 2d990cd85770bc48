"""DoRA kernels and their launchers: the weight norm, and the LoRA GEMM with DoRA's per-column scale.

DoRA (Liu et al. 2024, PEFT 0.21 semantics) scales each output column of the LoRA layer by
``g = m / ‖W + sBA‖_row`` (fp32, the norm detached). Three kernels:

- ``_dora_norm_kernel``: ``‖W_j + s B_j A‖₂`` for a block of rows in one pass over W's tiles, each tile
  of ``W + s B A`` formed in fp32 registers (never in memory) and squared-summed in fp32. Always exact:
  no cancellation when ``sBA ≈ −W``. It reads W once, as the factored form
  ``‖W_j‖² + 2s (W Aᵀ)_j·B_j + s² B_j (A Aᵀ) B_jᵀ`` must too (``W Aᵀ`` changes with A every step), for
  the same 2·N·K·r flops, so on the GPU the factored form buys nothing; the reference path uses it
  (``fastpeft.ops.dora``), where it maps to BLAS calls.
- ``_dora_gemm_kernel``: a tiled GEMM modelled on ``kernels.lora._lora_gemm_kernel`` with the scale fused
  (no second pass). ``MODE`` picks the formula (a (M, K), b (K, N), lu (M, R), lv (R, N), fp32 accumulators):
    0 FWD        out = g_n ⊙ (a b + s lu lv) + bias                          (eval, p = 0, lora_only)
    1 FWD_EXACT  out = a b + (g_n − 1) ⊙ (ds · keep(a) b) + g_n ⊙ s lu lv + bias   (PEFT's dropout)
    2 DX         out = (a ⊙ g_k) b + s keep_out ⊙ (lu lv)                    (keep only with HAS_MASK)
    3 DX_EXACT   out = a b + ds · keep_out ⊙ ((a ⊙ (g_k − 1)) b + s lu lv)
    4 DM_EXACT   part[pid_m, n] = Σ_rows c ⊙ (ds · keep(a) b + s lu lv)        (c = dY; no (M, N) store)
  g_n scales output columns (in the epilogue), g_k the reduction index (in the prologue, on a's tile in
  registers: the g-scaled dY never reaches memory). Modes 1 and 3 keep two accumulators over the same
  loaded tiles: PEFT's exact dropout costs twice the tensor-core work but no extra memory traffic.
  keep(a): the Philox mask of x (M, K) at (m, k) (``fastpeft.reference.dropout_mask``); keep_out: the
  same mask on the output (M, N = x's K) at (m, n).
- ``_dora_dy_kernel``: one pass over dY (and the saved output y): ``v = (dY ⊙ g) B`` (M, R) fp32 and the
  per-row-block partial sums of ``dY ⊙ (y − bias)`` for the magnitude's gradient.

This module imports only torch and triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, is_deterministic
from ._common import (_HAS_TRITON_OP, _cast, _dot_precision, _grouped_tile, _keep_mask, _library_op, _mma, _op_body,
                      _seed, _tile_ranges, _upcast, _use_explicit_blocks, _wrap, block_setter, eager_or_op, fit_stages,
                      r_pad)
from .lora import _lowrank_tile

FWD, FWD_EXACT, DX, DX_EXACT, DM_EXACT = 0, 1, 2, 3, 4

# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _dora_norm_kernel(
    # pointers
    w_ptr, a_ptr, b_ptr, out_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    # scalars
    scale,
    # meta-parameters (R_CHUNK: the rank slice of one dot, a power of two <= R_PAD)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, R_CHUNK)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    b_rows = b_ptr + rn[:, None].to(tl.int64) * stride_bn
    if R_CHUNK == R_PAD:
        # B's rows stay in registers for the whole pass; scaled once, in fp32.
        bb = tl.load(b_rows + rc[None, :] * stride_br, mask=n_ok[:, None] & (rc < R)[None, :],
                     other=0.0).to(tl.float32) * scale
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        t = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :].to(tl.int64) * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        # fp32 dot at full precision (DOT_PRECISION="ieee"): a TF32 sBA would cost the norm 10 bits. It runs on
        # FMAs, each thread holding the whole rank slice of its rows of B and columns of A: above 16 ranks a
        # slice at a time (B's slices reloaded per K step, from L1/L2), else it spills on sm_90 (triton 3.9,
        # bf16, 32x128 / 4 warps: 320 B at R_PAD 32, 5408 B at 64). The slices add into t in rank order,
        # as one dot's FMA chain over the rank does.
        for r0 in tl.static_range(0, R_PAD, R_CHUNK):
            rr = r0 + rc
            r_ok = rr < R
            if R_CHUNK != R_PAD:
                bb = tl.load(b_rows + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                             other=0.0).to(tl.float32) * scale
            a = tl.load(a_ptr + rr[:, None] * stride_ar + kk[None, :].to(tl.int64) * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            t = tl.dot(bb, a, t, input_precision=DOT_PRECISION)
        acc += tl.sum(t * t, axis=1)
    tl.store(out_ptr + rn, tl.sqrt(acc), mask=n_ok)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _dora_gemm_kernel(
    # pointers (c_ptr: dY for DM_EXACT; part_ptr: its (cdiv(M, BLOCK_M), N) fp32 partial sums)
    a_ptr, b_ptr, lu_ptr, lv_ptr, g_ptr, bias_ptr, c_ptr, out_ptr,
    # sizes (M_KEY: M rounded up to a power of two, only an autotuning key)
    M, N, K, R, M_KEY,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_lum, stride_lur, stride_lvr, stride_lvn,
    stride_cm, stride_cn, stride_om, stride_on,
    # scalars: s, dropout seed / threshold (keep when draw >= threshold) and 1 / (1 - p)
    scale, seed, threshold, drop_scale,
    # meta-parameters
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, LOW_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn, rk, m_ok, n_ok = _tile_ranges(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    # Row / column base pointers (1-D) instead of loop-carried 2-D pointer tiles: on sm_90 the 2-D int64
    # pointer tiles of a 128x128x64 bf16 tile cost 128 registers per thread and spill (ptxas, 8 warps).
    a_rows = a_ptr + rm.to(tl.int64) * stride_am
    b_cols = b_ptr + rn.to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # a b (or (a ⊙ g_k) b, or keep(a) b)
    if MODE == 1 or MODE == 3:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the second product, over the same tiles
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_rows[:, None] + kk[None, :].to(tl.int64) * stride_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_cols[None, :] + kk[:, None].to(tl.int64) * stride_bk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if MODE == 0:
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
        elif MODE == 1:
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
            offs = rm[:, None].to(tl.int64) * K + kk[None, :].to(tl.int64)
            acc2 = _mma(tl.where(_keep_mask(seed, offs, threshold), a, 0.0), b, acc2, DOT_PRECISION, UPCAST)
        elif MODE == 2:
            gk = tl.load(g_ptr + kk, mask=k_ok, other=0.0)
            acc = _mma(_cast(a.to(tl.float32) * gk[None, :], a.dtype, UPCAST), b, acc, DOT_PRECISION, UPCAST)
        elif MODE == 3:
            gk = tl.load(g_ptr + kk, mask=k_ok, other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
            acc2 = _mma(_cast(a.to(tl.float32) * (gk - 1.0)[None, :], a.dtype, UPCAST), b, acc2, DOT_PRECISION,
                        UPCAST)
        else:
            offs = rm[:, None].to(tl.int64) * K + kk[None, :].to(tl.int64)
            acc = _mma(tl.where(_keep_mask(seed, offs, threshold), a, 0.0), b, acc, DOT_PRECISION, UPCAST)

    # Epilogue: the rank-R update on the tile, then the mode's combination, one store.
    low = _lowrank_tile(lu_ptr, lv_ptr, rm, rn, m_ok, n_ok, N, R, stride_lum, stride_lur, stride_lvr, stride_lvn,
                        seed, threshold, LOW_MASK, BLOCK_M, BLOCK_N, R_PAD, DOT_PRECISION, UPCAST)
    if MODE == 0:
        gn = tl.load(g_ptr + rn, mask=n_ok, other=0.0)[None, :]
        res = gn * (acc + scale * low)
    elif MODE == 1:
        gn = tl.load(g_ptr + rn, mask=n_ok, other=0.0)[None, :]
        res = acc + (gn - 1.0) * (drop_scale * acc2) + gn * (scale * low)
    elif MODE == 2:
        res = acc + scale * low
    elif MODE == 3:
        offs = rm[:, None].to(tl.int64) * N + rn[None, :].to(tl.int64)
        res = acc + tl.where(_keep_mask(seed, offs, threshold), drop_scale * (acc2 + scale * low), 0.0)
    else:
        c = tl.load(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        part = tl.sum(c * (drop_scale * acc + scale * low), axis=0)
        tl.store(out_ptr + pid_m.to(tl.int64) * stride_om + rn.to(tl.int64) * stride_on, part, mask=n_ok)
    if MODE != 4:
        if HAS_BIAS:
            res += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :].to(tl.int64) * stride_on
        tl.store(out, _cast(res, out_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dora_dy_kernel(
    # pointers
    dy_ptr, y_ptr, g_ptr, bias_ptr, b_ptr, v_ptr, part_ptr,
    # sizes
    M, N, R,
    # strides
    stride_dm, stride_dn, stride_ym, stride_yn, stride_bn, stride_br, stride_vm, stride_vr, stride_pm,
    # meta-parameters
    HAS_DM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    rn0 = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    r_ok = rr < R
    v = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + rn0
        n_ok = rn < N
        ok = m_ok[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dm + rn[None, :].to(tl.int64) * stride_dn,
                     mask=ok, other=0.0)
        g = tl.load(g_ptr + rn, mask=n_ok, other=0.0)
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        # dY ⊙ g rounded to dY's dtype, as the dX GEMM's prologue rounds it (one value of G everywhere).
        v = _mma(_cast(dy.to(tl.float32) * g[None, :], dy.dtype, UPCAST), _cast(b, dy.dtype, UPCAST), v,
                 DOT_PRECISION, UPCAST)
        if HAS_DM:
            y = tl.load(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :].to(tl.int64) * stride_yn,
                        mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y -= tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            part = tl.sum(dy.to(tl.float32) * y, axis=0)
            tl.store(part_ptr + pid.to(tl.int64) * stride_pm + rn, part, mask=n_ok)
    tl.store(v_ptr + rm[:, None].to(tl.int64) * stride_vm + rr[None, :] * stride_vr, v,
             mask=m_ok[:, None] & r_ok[None, :])


def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in shapes]


# Autotuned configs per mode: those of kernels/lora.py's list that compile for sm_90 without spills
# (tools/sm90_resources.py, bf16, R_PAD=16, triton 3.9; stack bytes 0). 128x256 and 256x128 spill in every
# mode (800-6300 B), 128x128 with 4 warps spills 600 B; the masked dX keeps fewer (_prune_one_acc_configs).
# Not yet timed on a card.
_ONE_ACC_CONFIGS = _configs([(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)])
# Modes 1 and 3 hold two accumulators and redraw Philox for every element of a's (1) or the output's (3)
# tile: smaller tiles. Spill-free on sm_90: 64x128x64 / 8 warps, 64x64x32 / 4 warps; 128x128x32 / 8 warps
# spills 72 B (mode 1) and 656 B (mode 3), 64x64x64 / 4 warps 16-32 B.
_TWO_ACC_CONFIGS = _configs([(64, 128, 64, 8, 3), (64, 64, 32, 4, 3)])


def _prune_one_acc_configs(configs, named_args, **kwargs):
    """The configs the autotuner times. With the masked rank-R update (DX with dropout: ``LOW_MASK``) only those
    whose fp32 accumulator takes at most 32 registers a thread (BLOCK_M * BLOCK_N <= 32 * 32 * num_warps): the
    g-scaled prologue and the masked epilogue need the rest. Compiled for sm_90 (triton 3.9, bf16), 128x128 w8
    and 64x128 w4 spill 48 B (R_PAD 16) and 128-144 B (R_PAD 64) with the mask, 64x64 w4 none (138 / 149
    registers; benchmarks/results/sm90-resources-*.md); without the mask every config fits."""
    if not kwargs.get("LOW_MASK", named_args.get("LOW_MASK", False)):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps]


_dora_gemm_tuned = triton.autotune(configs=_ONE_ACC_CONFIGS, key=["M_KEY", "N", "K", "R_PAD", "MODE", "HAS_MASK"],
                                   prune_configs_by={"early_config_prune": _prune_one_acc_configs})(
    _dora_gemm_kernel)
_dora_gemm_tuned2 = triton.autotune(configs=_TWO_ACC_CONFIGS, key=["M_KEY", "N", "K", "R_PAD", "MODE"])(
    _dora_gemm_kernel)

# Explicit blocks for the interpreter and tests: small, so that odd sizes cross block edges.
_TEST_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
set_test_blocks = block_setter(_TEST_BLOCKS)
# DM_EXACT writes partial sums per BLOCK_M rows, so it runs one fixed config (an autotuner would leave
# stale rows of other configs' block counts). Not timed on a card; sm_90 (triton 3.9, bf16): 139 / 140
# registers at R_PAD 16 / 64, no spills (128x128x64 / 8 warps: 243 / 251, no spills).
_DM_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
# The norm and the dY pass are bandwidth-bound row sweeps; BLOCK_K=128 / BLOCK_N=64: not yet timed on a card.
_NORM_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
_NORM_R_CHUNK = 16  # ranks per dot in the norm kernel (see there): R_PAD 16 as one slice, held in registers
_DY_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def _norm_block_k(rp: int) -> int:
    """The norm's BLOCK_K at R_PAD ``rp`` on CUDA: 128 up to R_PAD 64, then halved per doubling. Compiled for
    sm_90 (triton 3.9, bf16, 32 rows, 4 warps): 214 / 235 / 241 registers at R_PAD 16 / 32 / 64, 178 at 128
    (BLOCK_K 64), 134 at 256 (32), no spills; BLOCK_K 128 spills 16 B at 128 and 40 B at 256."""
    return max(32, min(_NORM_BLOCKS["BLOCK_K"], 8192 // rp))


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W_j + s B_j A‖₂`` (out,) fp32: weight (N, K), lora_A (r, K), lora_B (N, r), any strides."""
    N, K = weight.shape
    R = lora_A.shape[0]
    out = torch.empty(N, device=weight.device, dtype=torch.float32)
    if N == 0:
        return out
    if _use_explicit_blocks(weight):
        bn, bk, warps, stages = 16, 32, 4, 1
    else:
        bn, warps, stages = (_NORM_BLOCKS[k] for k in ("BLOCK_N", "num_warps", "num_stages"))
        bk = _norm_block_k(r_pad(R))
    _wrap(_dora_norm_kernel)[(triton.cdiv(N, bn),)](
        weight, lora_A, lora_B, out, N, K, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling), BLOCK_N=bn, BLOCK_K=bk, R_PAD=r_pad(R), R_CHUNK=min(r_pad(R), _NORM_R_CHUNK),
        DOT_PRECISION="ieee", num_warps=warps,
        num_stages=stages,
    )
    return out


def pinned_config(configs: list, itemsize: int) -> dict:
    """Deterministic mode's one config of a mode's list: the first whose pipelined a and b tiles (``itemsize``
    bytes an element) fit shared memory. fp32 skips 128 x 128 x 64 at 4 stages (262144 B compiled for sm_90 with
    triton 3.6, which does not launch) for 64 x 128 x 64; bf16 keeps the first of every list."""
    def stage(c):
        return (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * itemsize
    c = next((c for c in configs if fit_stages(stage(c), c.num_stages) == c.num_stages), configs[-1])
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=fit_stages(stage(c), c.num_stages))


def dora_gemm(mode: int, a: torch.Tensor, b: torch.Tensor, lu: torch.Tensor, lv: torch.Tensor, g: torch.Tensor,
              bias: torch.Tensor | None, scale: float, seed=0, threshold: int = 0, drop_scale: float = 1.0,
              c: torch.Tensor | None = None) -> torch.Tensor:
    """One of the ``_dora_gemm_kernel`` formulas (see the module docstring): a (M, K), b (K, N), lu (M, R)
    (fp32 or a's dtype), lv (R, N), g (N,) for modes 0/1 or (K,) for 2/3, fp32; bias (N,) or None; c (M, N)
    for mode 4. Returns (M, N) in a's dtype, or for mode 4 the (cdiv(M, 64), N) fp32 partial sums."""
    M, K = a.shape
    N = b.shape[1]
    R = lu.shape[1]
    cfg = None
    if _use_explicit_blocks(a):
        cfg = dict({k: _TEST_BLOCKS[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}, num_warps=4,
                   num_stages=1)
    elif mode == DM_EXACT:
        cfg = dict(_DM_CONFIG)
    elif is_deterministic():
        # fastpeft.set_deterministic: one config per mode, not the autotuner's pick (whose BLOCK_K could
        # change the order of the sums between processes).
        cfg = pinned_config(_TWO_ACC_CONFIGS if mode in (FWD_EXACT, DX_EXACT)
                            else _prune_one_acc_configs(_ONE_ACC_CONFIGS, {}, LOW_MASK=mode == DX and threshold > 0),
                            a.element_size())
    if mode == DM_EXACT:
        out = torch.zeros((triton.cdiv(M, cfg["BLOCK_M"]), N), device=a.device, dtype=torch.float32)
    else:
        out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return out
    c_ = c if c is not None else out
    args = (a, b, lu, lv, g, bias if bias is not None else out, c_, out, M, N, K, R, triton.next_power_of_2(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), lu.stride(0), lu.stride(1), lv.stride(0),
            lv.stride(1), c_.stride(0), c_.stride(1), out.stride(0), out.stride(1), float(scale), seed,
            int(threshold), float(drop_scale))
    meta = dict(MODE=mode, HAS_BIAS=bias is not None, HAS_MASK=threshold > 0, LOW_MASK=mode == DX and threshold > 0,
                R_PAD=r_pad(R),
                DOT_PRECISION=_dot_precision(a.dtype), UPCAST=_upcast(a.dtype))
    if cfg is not None:
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _wrap(_dora_gemm_kernel)[grid](*args, **meta, **cfg)
    else:
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
        _wrap(_dora_gemm_tuned2 if mode in (FWD_EXACT, DX_EXACT) else _dora_gemm_tuned)[grid](*args, **meta)
    return out


def dora_dy_pass(dy: torch.Tensor, y: torch.Tensor | None, g: torch.Tensor, bias: torch.Tensor | None,
                 lora_B: torch.Tensor) -> tuple:
    """One pass over dY (M, N): ``v = (dY ⊙ g) B`` (M, r) fp32 and, when y (M, N) is given,
    ``Σ_i dY_ij (y_ij − bias_j)`` (N,) fp32 (partial sums per row block, added in a fixed order)."""
    M, N = dy.shape
    R = lora_B.shape[1]
    if _use_explicit_blocks(dy):
        bm, bn, warps, stages = 32, 32, 4, 1
    else:
        bm, bn, warps, stages = (_DY_BLOCKS[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    v = torch.empty((M, R), device=dy.device, dtype=torch.float32)
    part = torch.zeros((triton.cdiv(M, bm) if y is not None else 1, N), device=dy.device, dtype=torch.float32)
    if M == 0 or N == 0 or R == 0:
        return v.zero_(), (part.sum(0) if y is not None else None)
    y_ = y if y is not None else dy
    _wrap(_dora_dy_kernel)[(triton.cdiv(M, bm),)](
        dy, y_, g, bias if bias is not None else g, lora_B, v, part, M, N, R,
        dy.stride(0), dy.stride(1), y_.stride(0), y_.stride(1), lora_B.stride(0), lora_B.stride(1),
        v.stride(0), v.stride(1), part.stride(0),
        HAS_DM=y is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, R_PAD=r_pad(R),
        DOT_PRECISION=_dot_precision(dy.dtype), UPCAST=_upcast(dy.dtype), num_warps=warps, num_stages=stages,
    )
    return v, (part.sum(0) if y is not None else None)


# ----------------------------------------------------------------------------------------------------
# torch.library registration (as kernels/lora.py): torch.compile(fullgraph=True) traces these ops
# ----------------------------------------------------------------------------------------------------

def _dm_rows(M: int) -> int:
    return triton.cdiv(M, _TEST_BLOCKS["BLOCK_M"] if INTERPRET else _DM_CONFIG["BLOCK_M"])


if _HAS_TRITON_OP:
    @_library_op("fastpeft::dora_norm", mutates_args=())
    def _dora_norm_op(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float) -> torch.Tensor:
        with _op_body():
            return dora_norm(weight, lora_A, lora_B, scaling)

    @_library_op("fastpeft::dora_gemm", mutates_args=())
    def _dora_gemm_op(mode: int, a: torch.Tensor, b: torch.Tensor, lu: torch.Tensor, lv: torch.Tensor,
                      g: torch.Tensor, bias: torch.Tensor | None, scale: float, seed: int, threshold: int,
                      drop_scale: float, c: torch.Tensor | None = None,
                      seed_t: torch.Tensor | None = None) -> torch.Tensor:
        with _op_body():
            return dora_gemm(mode, a, b, lu, lv, g, bias, scale, _seed(seed, seed_t), threshold, drop_scale, c)

    @_library_op("fastpeft::dora_dy_pass", mutates_args=())
    def _dora_dy_pass_op(dy: torch.Tensor, y: torch.Tensor | None, g: torch.Tensor, bias: torch.Tensor | None,
                         lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _op_body():
            v, dm = dora_dy_pass(dy, y, g, bias, lora_B)
            return v, (dm if dm is not None else dy.new_zeros(0, dtype=torch.float32))

    if INTERPRET:  # see kernels/lora.py: the interpreted kernels must not run on fake tensors
        @_dora_norm_op.register_fake
        def _(weight, lora_A, lora_B, scaling):
            return weight.new_empty(weight.shape[0], dtype=torch.float32)

        @_dora_gemm_op.register_fake
        def _(mode, a, b, lu, lv, g, bias, scale, seed, threshold, drop_scale, c=None, seed_t=None):
            if mode == DM_EXACT:
                return a.new_empty((_dm_rows(a.shape[0]), b.shape[1]), dtype=torch.float32)
            return a.new_empty((a.shape[0], b.shape[1]))

        @_dora_dy_pass_op.register_fake
        def _(dy, y, g, bias, lora_B):
            return (dy.new_empty((dy.shape[0], lora_B.shape[1]), dtype=torch.float32),
                    dy.new_empty((dy.shape[1] if y is not None else 0,), dtype=torch.float32))

    def _dy_pass_registered(dy, y, g, bias, lora_B):
        v, dm = torch.ops.fastpeft.dora_dy_pass(dy, y, g, bias, lora_B)
        return v, (dm if y is not None else None)

    norm_op = eager_or_op(dora_norm, torch.ops.fastpeft.dora_norm)
    gemm_op = eager_or_op(dora_gemm, torch.ops.fastpeft.dora_gemm)
    dy_pass_op = eager_or_op(dora_dy_pass, _dy_pass_registered)
else:  # torch < 2.6: plain launchers (eager only)
    norm_op, gemm_op, dy_pass_op = dora_norm, dora_gemm, dora_dy_pass
