"""Registers, spills and shared memory of every shipped kernel config, compiled for sm_90 on the CPU.

No GPU needed: each kernel is compiled with triton's own compiler for ``GPUTarget("cuda", 90, 32)`` and
the cubin's resource line is read with triton's bundled ``cuobjdump`` (the same method as
``/work/shared/tools/sm90_resources.py``). Arguments are typed the way the runtime specializes a real
launch at the target shapes (M=8192, K=N=4096; bf16): pointers and sizes/strides divisible by 16 carry
``tt.divisibility=16``, a stride of 1 becomes the constant 1, ``do_not_specialize`` scalars are plain i64.

    python benchmarks/sm90_table.py                      # every kernel, R_PAD 16 and 64
    python benchmarks/sm90_table.py --only lora --kernel gemm --ranks 16
    python benchmarks/sm90_table.py --only dora quant   # files: lora lora_tma multi_lora sparse_delta dora quant
    python benchmarks/sm90_table.py --out benchmarks/results/sm90-resources-2026-11-30.md

"Shipped config" = every entry of an autotune list, the pinned deterministic config, and the block
sizes the launchers pick on CUDA (not the interpreter's explicit test blocks). The QLoRA fused kernel's
blocks depend on M: it is compiled at an M where each of its launcher's choices runs (4-bit: M = 1, 16,
64; int8: 16, 8192; over a dense W, lora_decode: 1, 16, 64 at N 4096 and 14336), the other kernels at
M=8192. A kernel spills when its stack frame is non-zero (``STACK`` in cuobjdump's resource line: local
memory for spilled registers).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be JIT functions here, not interpreted ones
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

M, K, N = 8192, 4096, 4096


@dataclass
class Launch:
    """One compiled variant: a kernel, the arguments of a real launch, warps and stages."""
    family: str
    kernel: object
    variant: str
    args: dict
    warps: int
    stages: int
    config: dict = field(default_factory=dict)  # what the table shows as the config
    tuned: bool = False  # an autotune list's entry (the autotuner skips it where it does not fit the card)

    @property
    def name(self) -> str:
        return _jit(self.kernel).__name__


def _jit(kernel):
    """The JITFunction of a kernel (an autotuned kernel wraps it in ``.fn``)."""
    while not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


# The activation dtype the table compiles for (--dtype): every bf16 operand of a launch becomes this one, and
# the launchers' dtype-dependent blocks (shared-memory fits, pinned configs) are asked for its element size;
# fp32 launches take the tensor-core precision --precision (TF32 where torch allows it, as the launchers do).
_ACT = {"dtype": "bf16", "precision": "tf32"}


def _ptr(dtype: str) -> str:
    return "*" + (_ACT["dtype"] if dtype == "bf16" else dtype)


def _isz() -> int:
    """Bytes an element of the activation dtype."""
    return {"bf16": 2, "fp16": 2, "fp32": 4}[_ACT["dtype"]]


def _named(name: str) -> dict:
    """Autotuner-style named arguments holding one empty operand ``name`` of the activation dtype (what the
    prunes read the element size from)."""
    import torch

    return {name: torch.empty(0, dtype={2: torch.bfloat16, 4: torch.float32}[_isz()])}


def signature(fn, args: dict) -> tuple:
    """(signature, constexprs, attrs) of ``fn`` for these launch arguments, specialized as the runtime
    would: ints equal to 1 become constants, ints and pointers divisible by 16 get the divisibility hint."""
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = args[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = v
        elif isinstance(v, str) and v.startswith("*"):
            sig[p.name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if p.do_not_specialize:
                sig[p.name] = "i64"
            elif v == 1:
                sig[p.name] = "constexpr"
                const[p.name] = 1
            else:
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return sig, const, attrs


_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_sm90(launch: Launch, target: int = 90) -> dict:
    fn = _jit(launch.kernel)
    sig, const, attrs = signature(fn, launch.args)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    t0 = time.perf_counter()
    try:
        ck = triton.compile(src, target=GPUTarget("cuda", target, 32),
                            options={"num_warps": launch.warps, "num_stages": launch.stages})
    except Exception as exc:  # report the failure in the table instead of stopping the whole run
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    try:
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return {"error": "no resource line in cuobjdump output"}
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "smem": ck.metadata.shared,
            "wgmma": "wgmma" in ck.asm["ptx"], "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------
# the shipped launches of each kernel file
# ----------------------------------------------------------------------------------------------------


def _cfg(c) -> tuple:
    """(blocks dict, warps, stages) of a triton.Config or a launch dict."""
    if isinstance(c, dict):
        c = dict(c)
        return c, c.pop("num_warps"), c.pop("num_stages")
    return dict(c.kwargs), c.num_warps, c.num_stages


def _as_config(blocks: dict, warps: int, stages: int):
    return triton.Config(dict(blocks), num_warps=warps, num_stages=stages)


def _cfg_text(blocks: dict, warps: int, stages: int) -> str:
    short = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "GROUP_M": "G", "BLOCK_P": "BP",
             "BLOCK_Q": "BQ", "BLOCK_E": "BE", "NUM_SMS": "SMs", "EPI_N": "EPI"}
    parts = [f"{short.get(k, k)}{v}" for k, v in blocks.items() if k not in ("NUM_SMS",)]
    return " ".join(parts) + f" w{warps} s{stages}"


def lora_launches(ranks) -> list:
    from fastpeft.kernels import lora as L

    out = []
    gemm_cfgs = [(_cfg(c), "") for c in L._GEMM_CONFIGS] + [(_cfg(L._PINNED_GEMM), " (pinned)")]
    for rp in ranks:
        for (blocks, w, s), tag in gemm_cfgs:
            common = dict(a_ptr=_ptr("bf16"), b_ptr=_ptr("bf16"), lu_ptr=_ptr("fp32"), lv_ptr=_ptr("bf16"),
                          bias_ptr=_ptr("bf16"), out_ptr=_ptr("bf16"), M=M, N=N, K=K, R=rp, M_KEY=M,
                          stride_am=K, stride_ak=1, stride_lum=rp, stride_lur=1, stride_om=N, stride_on=1,
                          scale=0.5, seed=1234, threshold=429496730, R_PAD=rp, DOT_PRECISION="tf32",
                          UPCAST=False, **blocks)
            # forward: b = W^T (K-major), lv = B^T (r-major), bias, no mask
            fwd = dict(common, stride_bk=1, stride_bn=K, stride_lvr=1, stride_lvn=rp, HAS_BIAS=True,
                       HAS_MASK=False)
            out.append(Launch("lora", L._lora_gemm_kernel, f"fwd R{rp}{tag}", fwd, w, s, dict(blocks), not tag))
            # dX = dY W (+ s mask * v A): b = W (N-major), lv = A (row-major), no bias
            for mask in (False, True):
                # the autotuner only times the configs its prune keeps for this launch (lora._prune_gemm_configs)
                prune = getattr(L, "_prune_gemm_configs", None)
                if mask and not tag and prune and not prune([_as_config(blocks, w, s)], {}, HAS_MASK=True):
                    continue
                dx = dict(common, stride_bk=N, stride_bn=1, stride_lvr=N, stride_lvn=1, HAS_BIAS=False,
                          HAS_MASK=mask)
                out.append(Launch("lora", L._lora_gemm_kernel, f"dX{' mask' if mask else ''} R{rp}{tag}", dx, w, s,
                                  dict(blocks), not tag))
        # the shrink: launcher blocks on CUDA 64 x 64, 4 warps, 3 stages (fewer where they do not fit: narrow_blocks)
        base = dict(P=M, Q=K, R=rp, q_per_split=1024, stride_os=M * rp, stride_op=rp, stride_or=1, seed=1234,
                    threshold=429496730, scale=1.0, BLOCK_P=64, R_PAD=rp, DOT_PRECISION="tf32",
                    UPCAST=False, out_ptr=_ptr("fp32"))
        shrinks = [  # (variant, a, b dtype, strides, mask strides)
            ("u=drop(x)A^T", dict(stride_ap=K, stride_aq=1, stride_bq=1, stride_br=K, mask_sp=K, mask_sq=1), "bf16",
             (False, True)),
            ("v=dY B", dict(stride_ap=N, stride_aq=1, stride_bq=rp, stride_br=1, mask_sp=0, mask_sq=0), "bf16",
             (False,)),
            ("dA^T=drop(x)^T v", dict(stride_ap=1, stride_aq=K, stride_bq=rp, stride_br=1, mask_sp=1, mask_sq=K),
             "fp32", (False, True)),
            ("dB=dY^T u", dict(stride_ap=1, stride_aq=N, stride_bq=rp, stride_br=1, mask_sp=0, mask_sq=0), "fp32",
             (False,)),
        ]
        for variant, strides, bdt, masks in shrinks:
            bq, st = L.narrow_blocks(64, rp, _isz(), 4 if bdt == "fp32" else _isz())
            for mask in masks:
                args = dict(base, **strides, a_ptr=_ptr("bf16"), b_ptr=_ptr(bdt), HAS_MASK=mask, BLOCK_Q=bq)
                out.append(Launch("lora", L._lora_shrink_kernel, f"{variant}{' mask' if mask else ''} R{rp}", args,
                                  4, st, {"BLOCK_P": 64, "BLOCK_Q": bq}))
        # the in-place low-rank add (cuBLAS path with dropout): 64 x 128, 4 warps, 1 stage
        add = dict(out_ptr=_ptr("bf16"), lu_ptr=_ptr("fp32"), lv_ptr=_ptr("bf16"), M=M, N=K, R=rp, stride_om=K,
                   stride_on=1, stride_lum=rp, stride_lur=1, stride_lvr=K, stride_lvn=1, scale=0.5, seed=1234,
                   threshold=429496730, HAS_MASK=True, BLOCK_M=64, BLOCK_N=128, R_PAD=rp, DOT_PRECISION="tf32",
                   UPCAST=False)
        out.append(Launch("lora", L._lora_lowrank_add_kernel, f"dX mask R{rp}", add, 4, 1,
                          {"BLOCK_M": 64, "BLOCK_N": 128}))
        # the dY pass (v = dY B, dB = s dY^T u): its autotune list and the pinned config, at the launcher's
        # BLOCK_M for this R_PAD and its column chunk on 132 SMs; lora_B (N, r) and u (M, r) row-major
        if hasattr(L, "_lora_dy_pass_kernel"):
            bm = L.dy_pass_block_m(M, rp)
            rows = -(-M // bm)
            chunk = L.split_chunk(N, max(1, min(-(-132 // rows), -(-N // (4 * L._DY_PASS_N_ALIGN)), 64)),
                                  L._DY_PASS_N_ALIGN)[0]
            dyp = dict(dy_ptr=_ptr("bf16"), b_ptr=_ptr("bf16"), u_ptr=_ptr("fp32"), v_ptr=_ptr("fp32"),
                       db_ptr=_ptr("fp32"), M=M, N=N, R=rp, n_per_split=chunk, M_KEY=M, stride_dym=N, stride_dyn=1,
                       stride_bn=rp, stride_br=1, stride_um=rp, stride_ur=1, stride_vs=M * rp, stride_vm=rp,
                       stride_vr=1, stride_dbs=N * rp, stride_dbn=rp, stride_dbr=1, scale=0.5, BLOCK_M=bm,
                       R_PAD=rp, DOT_PRECISION="tf32", UPCAST=False)
            for c, tag in [(c, "") for c in L._DY_PASS_CONFIGS] + [(L.pinned_dy_pass(bm, rp, _isz()), " (pinned)")]:
                blocks, w, s = _cfg(c)
                out.append(Launch("lora", L._lora_dy_pass_kernel, f"v, dB from dY R{rp}{tag}", dict(dyp, **blocks),
                                  w, s, dict({"BLOCK_M": bm}, **blocks), not tag))
    return out


def lora_tma_launches(ranks, all_configs=False) -> list:
    from fastpeft.kernels import lora_tma as T

    out = []
    for rp in ranks:
        for c, tag in [(c, "") for c in T._TMA_CONFIGS] + [(_as_config(*_cfg(T.pinned_tma(_isz()))), " (pinned)")]:
            blocks, w, s = _cfg(c)
            common = dict(a_ptr=_ptr("bf16"), b_ptr=_ptr("bf16"), lu_ptr=_ptr("fp32"), lv_ptr=_ptr("bf16"),
                          bias_ptr=_ptr("bf16"), out_ptr=_ptr("bf16"), la_ptr=_ptr("bf16"), flags_ptr=_ptr("i32"),
                          g_ptr=_ptr("fp32"), pu_ptr=_ptr("fp32"), part_ptr=_ptr("fp32"), stride_pum=rp,
                          y_ptr=_ptr("bf16"), yb_ptr=_ptr("bf16"), dm_ptr=_ptr("fp32"),
                          M=M, N=N, K=K, R=rp, M_KEY=M, stride_am=K, stride_b=K, stride_lum=rp, stride_lur=1, stride_om=N,
                          stride_la=K, scale=0.5, shrink_scale=1.1, seed=1234, threshold=429496730, R_PAD=rp,
                          NUM_SMS=132, DOT_PRECISION="tf32", UPCAST=False, SHRINK=False, X_MASK=False,
                          COL_SCALE=False, DB_PART=False, K_SCALE=False, DM_PART=False, DM_BIAS=False, **blocks)
            fwd = dict(B_NK=True, stride_lvr=1, stride_lvn=rp, HAS_BIAS=True, HAS_MASK=False)
            variants = [("fwd", fwd),
                        ("fwd+shrink", dict(fwd, SHRINK=True)),
                        ("fwd+shrink x-mask", dict(fwd, SHRINK=True, X_MASK=True)),
                        ("DoRA fwd+shrink", dict(fwd, SHRINK=True, COL_SCALE=True)),
                        ("dX", dict(B_NK=False, stride_lvr=N, stride_lvn=1, HAS_BIAS=False, HAS_MASK=False)),
                        ("dX mask", dict(B_NK=False, stride_lvr=N, stride_lvn=1, HAS_BIAS=False, HAS_MASK=True))]
            variants += [("dX+dY pass", dict(variants[-2][1], SHRINK=True, DB_PART=True)),
                         ("dX+dY pass mask", dict(variants[-1][1], SHRINK=True, DB_PART=True))]
            dora = dict(K_SCALE=True, DM_PART=True, DM_BIAS=True)
            variants += [("DoRA dX+dY pass", dict(variants[-2][1], **dora)),
                         ("DoRA dX+dY pass mask", dict(variants[-1][1], **dora))]
            for name, extra in variants:
                kept = T._prune_tma_configs([c], _named("a_ptr"), HAS_MASK=extra["HAS_MASK"], R_PAD=rp,
                                            SHRINK=extra.get("SHRINK", False), X_MASK=extra.get("X_MASK", False),
                                            DB_PART=extra.get("DB_PART", False), DM_PART=extra.get("DM_PART", False),
                                            K_SCALE=extra.get("K_SCALE", False))
                if not kept and not all_configs:
                    continue
                label = f"{name} R{rp}{tag}" + ("" if kept else " (pruned)")
                out.append(Launch("lora_tma", T._lora_gemm_tma_kernel, label, dict(common, **extra), w, s,
                                  dict(blocks), not tag))
            # many adapters (64 of them, ids int64 as the layers pass them), the no-grad forward
            kept = T._prune_multi_configs([c], _named("x_ptr"), R_PAD=rp)
            if kept or all_configs:
                args = dict(x_ptr=_ptr("bf16"), w_ptr=_ptr("bf16"), la_ptr=_ptr("bf16"), lb_ptr=_ptr("bf16"),
                            ids_ptr=_ptr("i64"), ranks_ptr=_ptr("i32"), scales_ptr=_ptr("fp32"),
                            bias_ptr=_ptr("bf16"), u_ptr=_ptr("fp32"), flags_ptr=_ptr("i32"), out_ptr=_ptr("bf16"),
                            M=M, N=N, K=K, R=rp, NA=64, M_KEY=M, stride_xm=K, stride_w=K, stride_la=K,
                            stride_lba=N * rp, stride_lbn=rp, stride_lbr=1, stride_um=rp, stride_om=N, HAS_BIAS=True,
                            R_PAD=rp, NUM_SMS=132, DOT_PRECISION="tf32", UPCAST=False,
                            SCALE_ON_B=_ACT["dtype"] == "fp16", **blocks)
                label = f"multi fwd+shrink R{rp}{tag}" + ("" if kept else " (pruned)")
                out.append(Launch("lora_tma", T._multi_lora_tma_kernel, label, args, w, s, dict(blocks), not tag))
    return out


def multi_launches(ranks) -> list:
    from fastpeft.kernels import multi_lora as ML

    out = []
    for rp in ranks:
        for bm in (16, 64):  # block_m_for: 16..64 rows
            bq, st = ML.narrow_blocks(bm, rp, _isz(), _isz())
            for mask in (False, True):
                args = dict(src_ptr=_ptr("bf16"), w_ptr=_ptr("bf16"), out_ptr=_ptr("fp32"), order_ptr=_ptr("i64"),
                            blocks_ptr=_ptr("i32"), ranks_ptr=_ptr("i32"), scales_ptr=_ptr("fp32"),
                            thr_ptr=_ptr("i64"), Q=K, R=rp, q_per_split=1024, T=M // bm + 64,
                            stride_sm=K, stride_sq=1, stride_wa=K * rp, stride_wq=1, stride_wr=K,
                            stride_os=M * rp, stride_op=rp, stride_or=1, seed=1234, mask_sm=K, mask_sq=1,
                            HAS_MASK=mask, BLOCK_M=bm, BLOCK_Q=bq, R_PAD=rp, DOT_PRECISION="tf32", UPCAST=False)
                out.append(Launch("multi_lora", ML._multi_shrink_kernel, f"shrink{' mask' if mask else ''} R{rp}",
                                  args, 4, st, {"BLOCK_M": bm, "BLOCK_Q": bq}))
                bn = 128 if rp <= 64 else 64
                args = dict(out_ptr=_ptr("bf16"), u_ptr=_ptr("fp32"), w_ptr=_ptr("bf16"), order_ptr=_ptr("i64"),
                            blocks_ptr=_ptr("i32"), ranks_ptr=_ptr("i32"), scales_ptr=_ptr("fp32"),
                            thr_ptr=_ptr("i64"), N=N, T=M // bm + 64, stride_om=N, stride_on=1, stride_um=rp,
                            stride_ur=1, stride_wa=N * rp, stride_wr=1, stride_wn=rp, seed=1234, mask_sm=N,
                            mask_sn=1, HAS_MASK=mask, BLOCK_M=bm, BLOCK_N=bn, R_PAD=rp, DOT_PRECISION="tf32",
                            UPCAST=False)
                out.append(Launch("multi_lora", ML._multi_expand_kernel, f"expand{' mask' if mask else ''} R{rp}",
                                  args, 4, 1, {"BLOCK_M": bm, "BLOCK_N": bn}))
        # BGMV (decode, no grad): the blocks bgmv_blocks picks on CUDA for this R_PAD; ranks int64 as the layers
        # pass them; thresholds int64 with the mask, the fp32 scales in their place without (never read)
        chunk, warps = ML.bgmv_tile(rp)
        for mask in (False, True):
            args = dict(out_ptr=_ptr("bf16"), x_ptr=_ptr("bf16"), a_ptr=_ptr("bf16"), b_ptr=_ptr("bf16"),
                        ids_ptr=_ptr("i64"), ranks_ptr=_ptr("i64"), scales_ptr=_ptr("fp32"),
                        thr_ptr=_ptr("i64" if mask else "fp32"), K=K, N=N, n_adapters=64, n_per_prog=2 * chunk,
                        stride_om=N, stride_on=1, stride_xm=K, stride_xk=1, stride_aa=rp * K, stride_ar=K,
                        stride_ak=1, stride_ba=N * rp, stride_bn=rp, stride_br=1, seed=1234, mask_sm=K, mask_sk=1,
                        HAS_MASK=mask, BLOCK_K=chunk, BLOCK_N=chunk, R_PAD=rp, UPCAST=False)
            out.append(Launch("multi_lora", ML._multi_bgmv_kernel, f"bgmv{' mask' if mask else ''} R{rp}", args, warps,
                              1, {"BLOCK_K": chunk, "BLOCK_N": chunk}))
        for mask in (False, True):
            args = dict(src_ptr=_ptr("bf16"), g_ptr=_ptr("fp32"), out_ptr=_ptr("bf16"), order_ptr=_ptr("i64"),
                        bounds_ptr=_ptr("i32"), ranks_ptr=_ptr("i32"), scales_ptr=_ptr("fp32"), thr_ptr=_ptr("i64"),
                        P=K, R=rp, SPLIT=2, stride_sm=K, stride_sp=1, stride_gm=rp, stride_gr=1, stride_os=64 * K * rp,
                        stride_oa=K * rp, stride_op=rp, stride_or=1, seed=1234, mask_sm=K, mask_sp=1, HAS_MASK=mask,
                        BLOCK_M=32, BLOCK_P=64, R_PAD=rp, DOT_PRECISION="tf32", UPCAST=False)
            out.append(Launch("multi_lora", ML._multi_segment_grad_kernel,
                              f"segment grad{' mask' if mask else ''} R{rp}",
                              args, 4, 3, {"BLOCK_M": 32, "BLOCK_P": 64}))
    return out


def sparse_launches(ranks) -> list:
    from fastpeft.kernels import sparse_delta as SD

    out = []
    out.append(Launch("sparse_delta", SD._densify_flat_kernel, "densify flat",
                      dict(w_ptr=_ptr("bf16"), dst_ptr=_ptr("bf16"), idx_ptr=_ptr("i64"), val_ptr=_ptr("bf16"),
                           nnz=167772, in_features=K, stride_wr=K, stride_wc=1, stride_dr=K, stride_dc=1, stride_i=1,
                           stride_v=1, BLOCK=1024, UPCAST=False), 4, 3, {"BLOCK": 1024}))
    for b in (32, 64):
        sub = min(64, b)
        out.append(Launch("sparse_delta", SD._densify_block_kernel, f"densify b{b}",
                          dict(w_ptr=_ptr("bf16"), dst_ptr=_ptr("bf16"), idx_ptr=_ptr("i64"), val_ptr=_ptr("bf16"),
                               out_features=N, in_features=K, b=b, NSUB=1, stride_wr=K, stride_wc=1, stride_dr=K,
                               stride_dc=1, stride_ib=2, stride_ic=1, stride_vb=b * b, stride_vr=b, stride_vc=1,
                               SUB=sub, UPCAST=False), 4, 3, {"SUB": sub}))
        out.append(Launch("sparse_delta", SD._sddmm_block_kernel, f"sddmm blocks b{b}",
                          dict(dy_ptr=_ptr("bf16"), x_ptr=_ptr("bf16"), idx_ptr=_ptr("i64"), out_ptr=_ptr("fp32"),
                               M=M, N=N, K=K, b=b, NSUB=1, m_per_split=1024, stride_dm=N, stride_dn=1, stride_xm=K,
                               stride_xk=1, stride_ib=2, stride_ic=1, stride_os=160 * b * b, stride_ob=b * b,
                               stride_or=b, stride_oc=1, SUB=sub, BLOCK_M=64, DOT_PRECISION="tf32", UPCAST=False),
                          4, 3, {"SUB": sub, "BLOCK_M": 64}))
    for t in (32, 64):
        out.append(Launch("sparse_delta", SD._sddmm_tile_kernel, f"sddmm tiles T{t}",
                          dict(dy_ptr=_ptr("bf16"), x_ptr=_ptr("bf16"), tiles_ptr=_ptr("i32"), count_ptr=_ptr("i32"),
                               starts_ptr=_ptr("i32"), order_ptr=_ptr("i32"), loc_ptr=_ptr("i32"),
                               scratch_ptr=_ptr("fp32"), out_ptr=_ptr("fp32"), M=M, N=N, K=K, n_tc=K // t,
                               m_per_split=1024, stride_dm=N, stride_dn=1, stride_xm=K, stride_xk=1, stride_os=167772,
                               T=t, BLOCK_M=64, BLOCK_E=128, DOT_PRECISION="tf32", UPCAST=False),
                          4, 2, {"T": t, "BLOCK_M": 64, "BLOCK_E": 128}))
    out.append(Launch("sparse_delta", SD._gather_dot_kernel, "gather-dot",
                      dict(dy_ptr=_ptr("bf16"), x_ptr=_ptr("bf16"), idx_ptr=_ptr("i64"), out_ptr=_ptr("fp32"), M=M,
                           nnz=4096, K=K, m_per_split=1024, stride_dm=N, stride_dn=1, stride_xm=K, stride_xk=1,
                           stride_i=1, stride_os=4096, BLOCK_E=64, BLOCK_M=32), 4, 3, {"BLOCK_E": 64, "BLOCK_M": 32}))
    # the block-fused GEMM: its autotune list for 32 x 32 blocks (the target), plain and with LoRA (RoSA)
    db = 32
    tuned = SD._sparse_gemm_tuned(db)
    from fastpeft.kernels.lora import _PINNED_GEMM

    cfgs = [_cfg(c) for c in tuned.configs] + [_cfg(dict(_PINNED_GEMM, BLOCK_K=min(_PINNED_GEMM["BLOCK_K"], db)))]
    for i, (blocks, w, s) in enumerate(cfgs):
        common = dict(a_ptr=_ptr("bf16"), w_ptr=_ptr("bf16"), bmap_ptr=_ptr("i32"), val_ptr=_ptr("bf16"),
                      lu_ptr=_ptr("fp32"), bias_ptr=_ptr("bf16"), out_ptr=_ptr("bf16"), M=M, N=N, K=K,
                      M_KEY=M, stride_am=K, stride_ak=1, stride_vb=db * db, stride_lum=16, stride_lur=1, stride_om=N,
                      stride_on=1, scale=0.5, seed=1234, threshold=429496730, DB=db, R_PAD=16,
                      DOT_PRECISION="tf32", UPCAST=False, **blocks)
        fwd = dict(stride_wk=1, stride_wn=K, stride_mk=1, stride_mn=K // db, stride_vk=1, stride_vn=db,
                   lv_ptr=_ptr("bf16"), stride_lvr=1, stride_lvn=16, HAS_BIAS=True)
        dx = dict(stride_wk=K, stride_wn=1, stride_mk=K // db, stride_mn=1, stride_vk=db, stride_vn=1,
                  lv_ptr=_ptr("bf16"), stride_lvr=K, stride_lvn=1, HAS_BIAS=False)
        for variant, extra in (("fwd", dict(fwd, HAS_LOWRANK=False, HAS_MASK=False, R=0)),
                               ("dX", dict(dx, HAS_LOWRANK=False, HAS_MASK=False, R=0)),
                               ("fwd +LoRA R16", dict(fwd, HAS_LOWRANK=True, HAS_MASK=False, R=16)),
                               ("dX +LoRA mask R16", dict(dx, HAS_LOWRANK=True, HAS_MASK=True, R=16))):
            prune = getattr(tuned, "early_config_prune", None)
            if extra["HAS_MASK"] and prune and not prune([_as_config(blocks, w, s)], {}, HAS_MASK=True):
                continue  # the autotuner never launches this config with the mask
            out.append(Launch("sparse_delta", SD._sparse_gemm_kernel, f"{variant} b{db}", dict(common, **extra),
                              w, s, dict(blocks), i < len(cfgs) - 1))
    out += sparse_tma_launches()
    return out


def sparse_tma_launches(all_configs: bool = False, blocks_sizes=(32,)) -> list:
    """The TMA sparse GEMM (sm_90+): its autotune list, the forward and dX plain and with RoSA's LoRA epilogue
    (R_PAD 16; dX masked), for b x b blocks (32: the target); ``all_configs`` also the configs its prune drops."""
    from fastpeft.kernels import lora_tma as T
    from fastpeft.kernels import sparse_delta as SD

    out = []
    pinned = _as_config(*_cfg(T.pinned_tma(_isz())))
    for db in blocks_sizes:
        for c, tag in [(c, "") for c in T._TMA_CONFIGS] + [(pinned, " (pinned)")]:
            blocks, w, s = _cfg(c)
            common = dict(a_ptr=_ptr("bf16"), b_ptr=_ptr("bf16"), val_ptr=_ptr("fp32"), ptr_ptr=_ptr("i32"),
                          ent_ptr=_ptr("i32"), lu_ptr=_ptr("fp32"), lv_ptr=_ptr("bf16"), bias_ptr=_ptr("bf16"),
                          out_ptr=_ptr("bf16"), M=M, N=N, K=K, M_KEY=M, stride_am=K, stride_b=K, stride_vb=db * db,
                          stride_lum=16, stride_lur=1, stride_om=N, scale=0.5, seed=1234, threshold=429496730, DB=db,
                          R_PAD=16, NUM_SMS=132, DOT_PRECISION="tf32", UPCAST=False, **blocks)
            fwd = dict(B_NK=True, stride_vk=1, stride_vn=db, stride_lvr=1, stride_lvn=16, HAS_BIAS=True)
            dx = dict(B_NK=False, stride_vk=db, stride_vn=1, stride_lvr=K, stride_lvn=1, HAS_BIAS=False)
            for variant, extra in (("TMA fwd", dict(fwd, HAS_LOWRANK=False, HAS_MASK=False, R=0)),
                                   ("TMA dX", dict(dx, HAS_LOWRANK=False, HAS_MASK=False, R=0)),
                                   ("TMA fwd +LoRA R16", dict(fwd, HAS_LOWRANK=True, HAS_MASK=False, R=16)),
                                   ("TMA dX +LoRA mask R16", dict(dx, HAS_LOWRANK=True, HAS_MASK=True, R=16))):
                kept = SD._prune_sparse_tma_configs([c], _named("a_ptr"), HAS_MASK=extra["HAS_MASK"], R_PAD=16, DB=db)
                if not kept and not all_configs:
                    continue
                label = f"{variant} b{db}{tag}" + ("" if kept else " (pruned)")
                out.append(Launch("sparse_delta", SD._sparse_tma_kernel, label, dict(common, **extra), w, s,
                                  dict(blocks), not tag))
    return out


def dora_launches(ranks) -> list:
    from fastpeft.kernels import dora as D

    out = []
    for rp in ranks:
        # the norm (weight, lora_A, lora_B as given, bf16; fp32 out): the launcher's CUDA blocks, fp32 "ieee" dot
        nb, nw, ns = _cfg(D._NORM_BLOCKS)
        nb["BLOCK_K"] = D._norm_block_k(rp)
        out.append(Launch("dora", D._dora_norm_kernel, f"norm R{rp}",
                          dict(w_ptr=_ptr("bf16"), a_ptr=_ptr("bf16"), b_ptr=_ptr("bf16"), out_ptr=_ptr("fp32"), N=N,
                               K=K, R=rp, stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1, stride_bn=rp,
                               stride_br=1, scale=0.5, R_PAD=rp, R_CHUNK=min(rp, D._NORM_R_CHUNK), DOT_PRECISION="ieee",
                               **nb), nw, ns, nb))
        # the GEMM, one launch per mode as DoRALinearFunction makes it (u, v fp32 from the shrink / dY pass;
        # g fp32; an absent bias or c is the output). The deterministic config is each list's first entry
        # (already a row). HAS_MASK is only an autotuning key: the code depends on MODE and LOW_MASK.
        common = dict(a_ptr=_ptr("bf16"), b_ptr=_ptr("bf16"), lu_ptr=_ptr("fp32"), lv_ptr=_ptr("bf16"),
                      g_ptr=_ptr("fp32"), M=M, N=N, K=K, R=rp, M_KEY=M, stride_am=K, stride_ak=1, stride_lum=rp,
                      stride_lur=1, scale=0.5, seed=1234, drop_scale=1.25, R_PAD=rp, DOT_PRECISION="tf32",
                      UPCAST=False)
        # forward: b = W^T (K-major), lv = B^T (r-major), out (M, N)
        fwd = dict(common, stride_bk=1, stride_bn=K, stride_lvr=1, stride_lvn=rp, bias_ptr=_ptr("bf16"),
                   c_ptr=_ptr("bf16"), out_ptr=_ptr("bf16"), stride_cm=N, stride_cn=1, stride_om=N, stride_on=1,
                   HAS_BIAS=True)
        # dX: a = dY, b = W (N-major), lv = A (row-major), no bias, out (M, K)
        dx = dict(common, stride_bk=K, stride_bn=1, stride_lvr=K, stride_lvn=1, bias_ptr=_ptr("bf16"),
                  c_ptr=_ptr("bf16"), out_ptr=_ptr("bf16"), stride_cm=K, stride_cn=1, stride_om=K, stride_on=1,
                  HAS_BIAS=False)
        # dm (exact): the forward's operands, c = dY (M, N), fp32 partial sums (cdiv(M, BLOCK_M), N) out
        dm = dict(common, stride_bk=1, stride_bn=K, stride_lvr=1, stride_lvn=rp, bias_ptr=_ptr("fp32"),
                  c_ptr=_ptr("bf16"), out_ptr=_ptr("fp32"), stride_cm=N, stride_cn=1, stride_om=N, stride_on=1,
                  HAS_BIAS=False)
        modes = [  # (variant, mode, operands, HAS_MASK / LOW_MASK, configs)
            ("fwd", D.FWD, fwd, False, False, D._ONE_ACC_CONFIGS),
            ("fwd exact", D.FWD_EXACT, fwd, True, False, D._TWO_ACC_CONFIGS),
            ("dX", D.DX, dx, False, False, D._ONE_ACC_CONFIGS),
            ("dX mask", D.DX, dx, True, True, D._ONE_ACC_CONFIGS),
            ("dX exact", D.DX_EXACT, dx, True, False, D._TWO_ACC_CONFIGS),
            ("dm exact", D.DM_EXACT, dm, True, False, [D._DM_CONFIG]),
        ]
        for variant, mode, ops, mask, low, cfgs in modes:
            if cfgs is D._ONE_ACC_CONFIGS:  # the autotuner only times the configs its prune keeps
                cfgs = D._prune_one_acc_configs(cfgs, {}, LOW_MASK=low)
            # deterministic mode's config (a row of its own where it is not the list's first: fp32)
            pinned = D.pinned_config(cfgs, _isz()) if mode != D.DM_EXACT else dict(D._DM_CONFIG)
            if all(_cfg(c) != _cfg(pinned) for c in cfgs):
                cfgs = list(cfgs) + [pinned]
            for c in cfgs:
                blocks, w, s = _cfg(c)
                args = dict(ops, threshold=429496730 if mask else 0, MODE=mode, HAS_MASK=mask, LOW_MASK=low,
                            **blocks)
                fixed = _cfg(c) == _cfg(pinned)
                out.append(Launch("dora", D._dora_gemm_kernel, f"{variant} R{rp}{' (pinned)' if fixed else ''}", args,
                                  w, s, dict(blocks), not fixed and mode != D.DM_EXACT))
        # the dY pass: v only (exact; y and bias absent: dY and g in their place) or v and dm's sums (plain)
        db, dw, ds = _cfg(D._DY_BLOCKS)
        for variant, has_dm in (("v", False), ("v, dm", True)):
            args = dict(dy_ptr=_ptr("bf16"), y_ptr=_ptr("bf16"), g_ptr=_ptr("fp32"),
                        bias_ptr=_ptr("bf16" if has_dm else "fp32"), b_ptr=_ptr("bf16"), v_ptr=_ptr("fp32"),
                        part_ptr=_ptr("fp32"), M=M, N=N, R=rp, stride_dm=N, stride_dn=1, stride_ym=N, stride_yn=1,
                        stride_bn=rp, stride_br=1, stride_vm=rp, stride_vr=1, stride_pm=N, HAS_DM=has_dm,
                        HAS_BIAS=has_dm, R_PAD=rp, DOT_PRECISION="tf32", UPCAST=False, **db)
            out.append(Launch("dora", D._dora_dy_kernel, f"{variant} from dY R{rp}", args, dw, ds, db))
    return out


def quant_launches(ranks) -> list:
    from fastpeft.kernels import quant as Q

    out = []
    # the dequant pass (launcher: BLOCK 1024 bytes, 4 warps, triton's default 3 stages): NF4 (FP4 is the same code,
    # another table) bf16, block size 64, nested (uint8 absmax, 256-blocks of fp32 absmax2) or not
    for nested in (True, False):
        am = _ptr("u8") if nested else _ptr("fp32")
        args = dict(data_ptr=_ptr("u8"), code_ptr=_ptr("fp32"), absmax_ptr=am, code2_ptr=_ptr("fp32"),
                    absmax2_ptr=_ptr("fp32"), offset_ptr=_ptr("fp32"), out_ptr=_ptr("bf16"), n=N * K, BLOCKSIZE=64,
                    BLOCKSIZE2=256, NESTED=nested, W_DTYPE=2, BLOCK=1024, UPCAST=False)
        out.append(Launch("quant", Q._dequant_4bit_kernel, f"NF4{' nested' if nested else ''}", args, 4, 3,
                          {"BLOCK": 1024}))
    # the fused kernel, at the blocks qlora_fused picks per M on CUDA: 4-bit (nested NF4) at decode M (1, 16) and at
    # M = 64 (its bound FUSED_MAX_M); int8 (W8A16: every M) at M = 16 and 8192. u written, bias present.
    # The same kernel over a dense bf16 W (lora_decode: plain LoRA in one launch) at the blocks dense_blocks picks
    # on an H100 (132 SMs) for M 1 / 16 / 64 (triton specializes M = 1) and N 4096 or 14336 (BLOCK_N 32 / 64 at
    # R_PAD 16, 128 at R_PAD 64), plain and with DoRA's g in the epilogue (COL_SCALE).
    shapes = [("NF4 nested", 0, 1, (16, 64, 64, 8, 3)), ("NF4 nested", 0, 16, (16, 64, 64, 8, 3)),
              ("NF4 nested", 0, Q.FUSED_MAX_M, (64, 64, 32, 8, 3)), ("int8", 1, 16, (16, 64, 64, 8, 3)),
              ("int8", 1, M, (64, 128, 32, 8, 3))]
    dense = [(m, n) for m in (1, 16, Q.DENSE_MAX_M) for n in (4096, 14336)]
    for rp in ranks:
        blocks = dict.fromkeys((m, Q.dense_blocks(m, n, rp, 132, _isz())) for m, n in dense)  # one row per M and config
        dense_rows = [(name, 2, m, b) for name in ("dense", "dense g") for m, b in blocks]  # g: DoRA's decode
        for name, quant, m, (bm, bn, bk, w, s) in shapes + dense_rows:
            if quant == 0:  # the 4-bit tables and scales; the launcher caps BLOCK_K at the block size
                bk = min(bk, 64)
                qp = dict(w_ptr=_ptr("u8"), code_ptr=_ptr("fp32"), absmax_ptr=_ptr("u8"), code2_ptr=_ptr("fp32"),
                          absmax2_ptr=_ptr("fp32"), offset_ptr=_ptr("fp32"), scales_ptr=_ptr("bf16"), NESTED=True,
                          BLOCKSIZE=64, BLOCKSIZE2=256, W_DTYPE=2)
            elif quant == 2:  # dense bf16 W (and DoRA's fp32 g in scales_ptr); the unused table pointers: the output
                col = name == "dense g"
                qp = dict(w_ptr=_ptr("bf16"), code_ptr=_ptr("bf16"), absmax_ptr=_ptr("bf16"), code2_ptr=_ptr("bf16"),
                          absmax2_ptr=_ptr("bf16"), offset_ptr=_ptr("bf16"), scales_ptr=_ptr("fp32" if col else "bf16"),
                          NESTED=False, BLOCKSIZE=1, BLOCKSIZE2=256, W_DTYPE=0, COL_SCALE=col)
            else:  # int8 weight, fp32 row scales; the unused table pointers are the output
                qp = dict(w_ptr=_ptr("i8"), code_ptr=_ptr("bf16"), absmax_ptr=_ptr("bf16"), code2_ptr=_ptr("bf16"),
                          absmax2_ptr=_ptr("bf16"), offset_ptr=_ptr("bf16"), scales_ptr=_ptr("fp32"), NESTED=False,
                          BLOCKSIZE=1, BLOCKSIZE2=256, W_DTYPE=0)
            qp = {"COL_SCALE": False, **qp}
            for mask in (False, True):
                args = dict(qp, x_ptr=_ptr("bf16"), a_ptr=_ptr("bf16"), b_ptr=_ptr("bf16"), bias_ptr=_ptr("bf16"),
                            out_ptr=_ptr("bf16"), u_ptr=_ptr("fp32"), M=m, N=N, K=K, R=rp, stride_xm=K, stride_xk=1,
                            stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1, stride_bn=rp, stride_br=1, stride_om=N,
                            stride_on=1, stride_um=rp, stride_ur=1, scale=0.5, drop_scale=1.25 if mask else 1.0,
                            seed=1234, threshold=429496730 if mask else 0, QUANT=quant, HAS_BIAS=True, HAS_MASK=mask,
                            WRITE_U=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, R_PAD=rp, DOT_PRECISION="tf32",
                            UPCAST=False)
                out.append(Launch("quant", Q._qlora_fused_kernel, f"fused {name} M{m}{' mask' if mask else ''} R{rp}",
                                  args, w, s, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}))
    return out


FAMILIES = {"lora": lora_launches, "lora_tma": lora_tma_launches, "multi_lora": multi_launches,
            "sparse_delta": sparse_launches, "dora": dora_launches, "quant": quant_launches}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", nargs="+", type=int, default=[16, 64], help="R_PAD values (powers of two >= 16)")
    ap.add_argument("--only", nargs="+", choices=list(FAMILIES), help="kernel files to compile (default: all)")
    ap.add_argument("--kernel", help="only kernels whose name contains this")
    ap.add_argument("--all-configs", action="store_true",
                    help="also the TMA tutorial configs that lora_tma's prune drops (marked '(pruned)')")
    ap.add_argument("--out", help="markdown file (default benchmarks/results/sm90-resources-<date>.md)")
    ap.add_argument("--json", help="also write the rows as JSON")
    ap.add_argument("--title", default="", help="a line under the header (e.g. 'before the epilogue change')")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                    help="the activation dtype: every bf16 operand becomes it, and the launchers' blocks are theirs "
                         "for it")
    ap.add_argument("--precision", choices=["tf32", "ieee"], default="tf32",
                    help="fp32's dot precision (tf32: torch's 'high' / allow_tf32; ieee: 'highest', the default)")
    a = ap.parse_args(argv)
    _ACT.update(dtype=a.dtype, precision=a.precision)
    launches = []
    for fam in a.only or list(FAMILIES):
        launches += (FAMILIES[fam](a.ranks, True) if fam == "lora_tma" and a.all_configs else FAMILIES[fam](a.ranks))
    if a.kernel:
        launches = [x for x in launches if a.kernel in x.name]
    if a.dtype == "fp32":  # the tensor-core launches take the precision asked for (the norm's ieee stays)
        for x in launches:
            if x.args.get("DOT_PRECISION") == "tf32":
                x.args["DOT_PRECISION"] = a.precision
    rows = []
    for i, x in enumerate(launches):
        res = compile_sm90(x)
        row = dict(family=x.family, kernel=x.name, variant=x.variant,
                   config=_cfg_text(x.config, x.warps, x.stages), tuned=x.tuned, **res)
        rows.append(row)
        if "error" in res:
            print(f"[{i + 1}/{len(launches)}] {x.name} {x.variant} {row['config']}: {res['error']}", flush=True)
        else:
            print(f"[{i + 1}/{len(launches)}] {x.name} {x.variant} {row['config']}: regs {res['regs']} "
                  f"stack {res['stack']} smem {res['smem']} ({res['seconds']:.1f}s)", flush=True)
    date = time.strftime("%Y-%m-%d")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"sm90-resources-{date}.md")
    spilling = [r for r in rows if r.get("stack") and "(pruned)" not in r["variant"]]
    failed = [r for r in rows if "error" in r]
    # over the card's shared memory per block (227 KiB on sm_90): triton raises OutOfResources at launch
    too_big = [r for r in rows if r.get("smem", 0) > 232448 and "(pruned)" not in r["variant"] and not r["tuned"]]
    tuned_big = [r for r in rows if r.get("smem", 0) > 232448 and "(pruned)" not in r["variant"] and r["tuned"]]
    args = list(argv if argv is not None else sys.argv[1:])
    if "--title" in args:  # the title is printed on its own line
        i = args.index("--title")
        del args[i:i + 2]
    cmd = " ".join(["python benchmarks/sm90_table.py"] + args)
    lines = ["# sm_90 resources of the shipped kernel configs (compiled offline, no GPU)", "",
             f"triton {triton.__version__} | target sm_90 | {a.dtype}"
             + (f" ({a.precision})" if a.dtype == "fp32" else "") + f" | {date} | `{cmd}`", ""]
    if a.title:
        lines += [a.title, ""]
    lines += [f"{len(rows)} variants compiled; {len(spilling)} spill (stack > 0); {len(failed)} failed to compile; "
              f"{len(too_big)} fixed or pinned launches take more shared memory than sm_90's 232448 B a block "
              f"(would raise at launch); {len(tuned_big)} autotune entries do (the autotuner skips them). "
              "Registers per thread (255 = the cap), stack bytes per thread (spills), shared memory per block in "
              "bytes (triton's allocation). Launch arguments typed as at M=8192, K=N=4096 (the QLoRA fused kernel "
              "at the M its variant names).", "",
              "| file | kernel | variant | config | regs | spill (stack B) | smem B | wgmma |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['kernel']} | {r['variant']} | {r['config']} | compile error: "
                         f"{r['error']} | | | |")
        else:
            lines.append(f"| {r['family']} | {r['kernel']} | {r['variant']} | {r['config']} | {r['regs']} | "
                         f"{r['stack']} | {r['smem']} | {'yes' if r['wgmma'] else 'no'} |")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"wrote {out}: {len(rows)} variants, {len(spilling)} spill, {len(failed)} failed, {len(too_big)} fixed "
          f"launches over shared memory ({len(tuned_big)} autotune entries)")
    return 1 if failed or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
