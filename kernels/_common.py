"""What the kernel modules share: the Triton helpers every kernel body uses (the dropout mask drawn from
a seed or a pointer to one, fp32-accumulating dots, casts, the grouped tile order), the explicit block
tables of tests and the interpreter, the split heuristic of the reductions, and the ``torch.library``
plumbing (launches through ``wrap_triton`` inside a registered op, eager calls straight to the launcher).

This module imports only torch and triton.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import threading

import torch
import triton
import triton.language as tl

from . import INTERPRET, getenv

# ----------------------------------------------------------------------------------------------------
# kernel helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, offsets, threshold):
    """True where the draw for flat index ``offsets`` (int64) keeps its element: word ``offsets % 4`` of
    the Philox block at ``offsets // 4`` (see fastpeft.reference.dropout_mask). ``seed`` is an int, or a
    pointer to the one-element int64 tensor of a seed drawn inside a torch.compile region (read here, so
    that the seed never goes through the host)."""
    if seed.dtype.is_ptr():
        seed = tl.load(seed)
    c0, c1, c2, c3 = tl.randint4x(seed, offsets // 4)
    word = offsets % 4
    rnd = tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))
    return (rnd.to(tl.int64) & 0xFFFFFFFF) >= threshold


@triton.jit
def _keep_mask_tile(seed, rm, n0, N, threshold, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """``_keep_mask`` of the (BLOCK_M, SUB_N) tile at rows rm, columns n0 + [0, SUB_N) of an (M, N) output
    (flat index m * N + n), with a quarter of its Philox work and registers: the 4 words of one Philox
    block are 4 neighbours of one row, so one draw serves 4 elements. ALIGNED (N and n0 multiples of 4):
    group q of 4 columns is exactly the block at counter (m * N + n0) / 4 + q. Otherwise row m starts
    a = (m * N + n0) % 4 words into its first block, and column 4 q + j takes word a + j of block q, or word
    a + j - 4 of block q + 1 (a second draw, still half of ``_keep_mask``'s work). The same bits."""
    if seed.dtype.is_ptr():
        seed = tl.load(seed)
    base = rm[:, None].to(tl.int64) * N + n0                                      # (BLOCK_M, 1)
    ctr = base // 4 + tl.arange(0, SUB_N // 4)[None, :].to(tl.int64)             # (BLOCK_M, SUB_N // 4)
    c0, c1, c2, c3 = tl.randint4x(seed, ctr)
    if not ALIGNED:
        d0, d1, d2, d3 = tl.randint4x(seed, ctr + 1)
        a = base % 4
        c0, c1, c2, c3 = (tl.where(a == 0, c0, tl.where(a == 1, c1, tl.where(a == 2, c2, c3))),
                          tl.where(a == 0, c1, tl.where(a == 1, c2, tl.where(a == 2, c3, d0))),
                          tl.where(a == 0, c2, tl.where(a == 1, c3, tl.where(a == 2, d0, d1))),
                          tl.where(a == 0, c3, tl.where(a == 1, d0, tl.where(a == 2, d1, d2))))
    # join(join(c0, c2), join(c1, c3))[..., i, j] is word 2 i + j: the row-major reshape puts it at column
    # 4 q + 2 i + j of the tile.
    rnd = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BLOCK_M, SUB_N))
    return (rnd.to(tl.int64) & 0xFFFFFFFF) >= threshold


# UPCAST is set for bf16 under the interpreter only, where triton 3.9 mishandles bf16: tl.dot returns
# garbage and fp32 -> bf16 casts truncate instead of rounding to nearest even as GPUs do. With it, the
# two helpers below give the GPU's results on the CPU.


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in fp32. bf16 products are exact in fp32, so UPCAST changes nothing else."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even also where the interpreter would truncate to bf16."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # keep the high 16 bits, rounded
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _pow2_part(s):
    """2^e of s = m 2^e (frexp: 0.5 <= |m| < 1) where |s| > 1, else 1.0, elementwise on finite fp32 s (its
    exponent bits): s / _pow2_part(s) has |.| <= 1, and both that division and a product by it are exact."""
    bits = s.to(tl.int32, bitcast=True)
    p = ((((bits >> 23) & 0xFF) + 1) << 23).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(s) > 1.0, p, 1.0)


@triton.jit
def _grouped_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile`` of a num_m x num_n grid in grouped order (as in Triton's matmul
    tutorial): GROUP_M row-blocks run together and share their B tiles in L2."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program (one output tile each) in grouped order (``_grouped_coords``)."""
    return _grouped_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def _tile_ranges(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(rm, rn, rk, m_ok, n_ok) of output tile (pid_m, pid_n) of an (M, N) GEMM: its rows, its columns, the
    first K step's offsets, and which rows / columns lie inside the output."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, tl.arange(0, BLOCK_K), rm < M, rn < N


@triton.jit
def _lowrank_bias_part(acc, lu, rm, n0, lv_ptr, bias_ptr, N, R, stride_lvr, stride_lvn, seed, threshold,
                       HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, N_ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
                       SUB_N: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``(acc, rn, n_ok)`` for columns rn = [n0, n0 + SUB_N) of the rows rm of a GEMM epilogue: acc (BLOCK_M,
    SUB_N) fp32, plus (HAS_MASK) the masked rank-R update mask * (lu @ lv) with lu (BLOCK_M, R_PAD) already
    scaled, plus the bias. N_ALIGNED: N is known to be a multiple of 4 (else checked at run time)."""
    rn = n0 + tl.arange(0, SUB_N)
    n_ok = rn < N
    if HAS_MASK:
        rr = tl.arange(0, R_PAD)
        lv = tl.load(lv_ptr + rr[:, None] * stride_lvr + rn[None, :].to(tl.int64) * stride_lvn,
                     mask=(rr < R)[:, None] & n_ok[None, :], other=0.0)
        low = _mma(lu, lv, tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32), DOT_PRECISION, UPCAST)
        # n0 is a multiple of SUB_N >= 16: with N a multiple of 4, each Philox block is 4 columns of one row.
        if N_ALIGNED:
            keep = _keep_mask_tile(seed, rm, n0, N, threshold, BLOCK_M, SUB_N, True)
        elif N % 4 == 0:
            keep = _keep_mask_tile(seed, rm, n0, N, threshold, BLOCK_M, SUB_N, True)
        else:
            keep = _keep_mask_tile(seed, rm, n0, N, threshold, BLOCK_M, SUB_N, False)
        acc += tl.where(keep, low, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc, rn, n_ok


# ----------------------------------------------------------------------------------------------------
# launch parameters
# ----------------------------------------------------------------------------------------------------


def scale_onto_lv(lv: torch.Tensor, scale: float) -> tuple:
    """``(lv, scale)`` for an epilogue that folds ``scale`` into lu, rounded to lv's dtype (the tensor cores take
    one dtype). In fp16 with |scale| > 1 (s, or s / (1 - p) with dropout) that overflows from |lu| > 65504 / |scale|,
    where PyTorch's ``(u @ lv) * scale`` holds u itself. There scale = m 2^e (frexp: 0.5 <= |m| < 1) is split:
    ``(2^e lv, m)``, the power of two onto the R x N factor (exact: no rounding, and lv is a LoRA factor, far
    from fp16's max), m onto lu (no larger than u). Rounding m u and scaling by 2^e commute, so the result has the
    bits of the unsplit fold wherever m u is in fp16's normal range (below it m u keeps fewer bits than s u did;
    PyTorch holds u itself there). Other dtypes (bf16 has fp32's range) and |scale| <= 1: as given."""
    if lv.dtype == torch.float16 and abs(scale) > 1.0:
        m, e = math.frexp(scale)
        return lv * float(2 ** e), m
    return lv, scale


def block_setter(table: dict):
    """A ``set_test_blocks(**blocks)`` for one module's explicit block table: it overrides known block
    sizes and returns the previous values (to restore them)."""
    def set_test_blocks(**blocks) -> dict:
        old = dict(table)
        unknown = set(blocks) - set(table)
        if unknown:
            raise ValueError(f"unknown block names {sorted(unknown)}; known: {sorted(table)}")
        table.update(blocks)
        return old
    return set_test_blocks


def _use_explicit_blocks(t: torch.Tensor) -> bool:
    """Explicit blocks under the interpreter, and with FASTPEFT_AUTOTUNE=0 (GPU tests: many small odd
    shapes would otherwise compile and time every config for each)."""
    return INTERPRET or not t.is_cuda or getenv("FASTPEFT_AUTOTUNE") == "0"


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (where a host sync is an error)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def r_pad(r: int) -> int:
    """Rank padded to a power of two of at least 16 (tl.dot's smallest dimension on GPUs)."""
    return max(16, triton.next_power_of_2(int(r)))


# Shared memory one program may take on sm_90 (227 KiB = 232448 B), less a margin for what the compiler adds to
# the pipelined operand tiles (barriers, layout conversions).
SMEM_BUDGET = 223 * 1024


def fit_stages(stage_bytes: int, stages: int, budget: int = SMEM_BUDGET) -> int:
    """The most pipeline stages, at most ``stages`` and at least 1, whose operand tiles (``stage_bytes`` a stage)
    fit ``budget``. A pointer-load kernel's shared memory on sm_90 is at most stages x the bytes of the tiles one
    K step loads: compiled for sm_90 (triton 3.6), the shrink at 64 x 64, R_PAD 256, fp32, 3 stages takes exactly
    3 x (64·64 + 64·256) x 4 = 245760 B, which does not launch (benchmarks/results/sm90-resources-fp32-*.md)."""
    return max(1, min(int(stages), int(budget) // max(int(stage_bytes), 1)))


def narrow_blocks(rows: int, rp: int, a_itemsize: int, b_itemsize: int, block_q: int = 64,
                  stages: int = 3) -> tuple:
    """``(BLOCK_Q, stages)`` of a narrow-output GEMM on a GPU (the shrinks: a (rows, BLOCK_Q) tile of a against
    a (BLOCK_Q, R_PAD) tile of b per K step): ``block_q`` and ``stages`` where both tiles fit shared memory, else
    fewer stages, and BLOCK_Q halved (down to 16) where even one stage would not fit (R_PAD 1024 in fp32)."""
    while block_q > 16 and block_q * (rows * a_itemsize + rp * b_itemsize) > SMEM_BUDGET:
        block_q //= 2
    return block_q, fit_stages(block_q * (rows * a_itemsize + rp * b_itemsize), stages)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul policy, as nn.Linear does: full fp32 unless the user allows TF32.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """CUDA device ``device_index``'s SM count, looked up once: launchers on the decode path (``lora_decode``'s
    blocks, the split counts, the persistent grids) ask at every call, and the lookup costs microseconds."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_count(t: torch.Tensor, programs: int, length: int, block: int) -> int:
    """How many partial sums a reduction of ``length`` elements, stepped ``block`` at a time by each of
    ``programs`` programs, is cut into: enough programs to fill the GPU (two per SM), each still looping
    over at least 4 blocks, at most 64 partials. Under explicit blocks, 2 once the reduction spans more
    than two blocks, so that the interpreter exercises the split path."""
    if _use_explicit_blocks(t):
        return 1 if length <= 2 * block else 2
    want = triton.cdiv(2 * _sm_count(t.device.index or 0), max(int(programs), 1))
    return max(1, min(want, triton.cdiv(length, 4 * block), 64))


def split_chunk(length: int, split: int, block: int) -> tuple:
    """``(per_split, split)``: each partial sum covers ``per_split`` elements (a multiple of ``block``),
    and ``split`` is recounted so that none is empty; ``(0, 1)`` for an empty reduction."""
    if length == 0:
        return 0, 1
    per = triton.cdiv(triton.cdiv(length, split), block) * block
    return per, max(1, triton.cdiv(length, per))


# ----------------------------------------------------------------------------------------------------
# torch.library plumbing: torch.compile(fullgraph=True) traces the registered ops and the kernels inside.
# ----------------------------------------------------------------------------------------------------

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
_state = threading.local()

# Under TRITON_INTERPRET the kernels are Python functions that would run on fake tensors when
# torch.compile traces a triton_op's body, so there the ops are opaque custom ops (given fakes in each
# module) that the compiled graph calls: the CPU tests compile the triton backend too. On GPUs, triton_op.
_library_op = torch.library.custom_op if INTERPRET else getattr(torch.library, "triton_op", None)


def _wrap(kernel):
    """The kernel as launched from a launcher: through ``wrap_triton`` inside a registered op's body (so
    torch.compile and fake tensors see it), directly otherwise. Eager calls skip the ops: going through
    the op dispatcher and ``wrap_triton`` costs host time per launch that small LoRA kernels cannot hide."""
    # Under TRITON_INTERPRET the op bodies are opaque custom ops, and triton 3.6's interpreted kernels are not
    # JITFunctions, which torch 2.11's wrap_triton refuses: called directly there.
    return torch.library.wrap_triton(kernel) if getattr(_state, "in_op", False) and not INTERPRET else kernel


@contextlib.contextmanager
def _op_body():
    prev = getattr(_state, "in_op", False)
    _state.in_op = True
    try:
        yield
    finally:
        _state.in_op = prev


def _seed(seed: int, seed_t: torch.Tensor | None):
    """A registered op's seed as its launcher takes it: the tensor ``seed_t`` when given, else ``seed``."""
    return seed if seed_t is None else seed_t


def eager_or_op(launcher, op):
    """A callable running ``launcher`` directly in eager mode and the registered ``op`` while
    torch.compile traces (where the op and its wrapped kernels are visible to the compiler). It takes the
    launcher's arguments, by position or by name.

    The seed is found by its name, ``seed``. A seed drawn inside a compiled region is a one-element
    tensor (``fastpeft.ops.common.draw_seed``); the op's schema has ``seed: int``, so the op gets 0 there
    and the tensor as its ``seed_t`` argument, and the kernels read it from memory. The launchers take
    either form as ``seed``. The op is called with every argument in the launcher's order, the
    launcher's defaults filled in.
    """
    if op is None:
        return launcher
    params = inspect.signature(launcher).parameters
    names = tuple(n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
    plain = any(p.kind == p.VAR_POSITIONAL for p in params.values())  # *args: passed on as they are
    seed_at = names.index("seed") if "seed" in names else None

    @functools.wraps(launcher)
    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return launcher(*args, **kwargs)
        if plain:
            return op(*args, **kwargs)
        values = list(args) + [kwargs[n] if n in kwargs else defaults[n] for n in names[len(args):]]
        if seed_at is not None and isinstance(values[seed_at], torch.Tensor):
            seed_t = values[seed_at]
            values[seed_at] = 0
            return op(*values, seed_t=seed_t)
        return op(*values)
    return call
