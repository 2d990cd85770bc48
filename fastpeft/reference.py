"""Every fastpeft op in plain PyTorch: the CPU path and the oracle that the kernels are tested against.

Nothing here is clever: each function is the formula written out with torch ops, so that a reader can
check it against the paper and a kernel can be checked against it.

Dropout masks are a pure function of ``(seed, position)``. Element ``(m, k)`` of the input viewed as
``(M, K)`` has flat index ``e = m * K + k`` and is kept when word ``e % 4`` of the Philox4x32-10 block at
counter ``e // 4`` (key ``seed``) is at least ``round(p * 2**32)``. That block is exactly what
``triton.language.randint4x(seed, e // 4)`` returns, so a fused kernel redraws the very same mask inside
its loads (forward and backward) without storing it, and a test can compare the kernel to this
reference bit for bit. Using all four words makes the mask four times cheaper to draw here.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al., SC'11), as in triton.language.random.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10


def philox4x(seed, counters: torch.Tensor) -> tuple:
    """The four 32-bit words of Philox4x32-10 at counter ``(c_lo, c_hi, 0, 0)``, key ``seed``.

    seed: an int in [0, 2**63), or a one-element int64 tensor holding one (the seed drawn inside a
    torch.compile region, see ``fastpeft.functional.draw_seed``: the same bits, no host sync).
    counters: int64 tensor of any shape, values >= 0. Returns four int64 tensors of its shape with values
    in [0, 2**32), equal to ``triton.language.randint4x(seed, counters)`` read as unsigned.
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=counters.device, dtype=torch.int64)
    elif not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    else:
        seed = int(seed)
    counters = counters.to(torch.int64)
    c0 = counters & _MASK32
    c1 = counters >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_PHILOX_ROUNDS):
        # Both factors are < 2**32, so each product fits 64 bits; int64 multiplication wraps, and the
        # wrapped value has the product's bit pattern. An arithmetic shift then a mask reads its high
        # word whatever the sign bit says.
        p_b = c2 * _PHILOX_ROUND_B
        p_a = c0 * _PHILOX_ROUND_A
        c0 = ((p_b >> 32) & _MASK32) ^ c1 ^ k0
        c2 = ((p_a >> 32) & _MASK32) ^ c3 ^ k1
        c1 = p_b & _MASK32
        c3 = p_a & _MASK32
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """The first Philox word at each offset: ``triton.language.randint(seed, offsets)`` read as unsigned."""
    return philox4x(seed, offsets)[0]


def philox_stream(seed: int, n: int, device=None) -> torch.Tensor:
    """``n`` uint32 draws (int64) for flat indices 0..n-1: index e is word e % 4 of the block at e // 4."""
    words = philox4x(seed, torch.arange((n + 3) // 4, device=device, dtype=torch.int64))
    return torch.stack(words, dim=-1).reshape(-1)[:n]


def dropout_threshold(p: float) -> int:
    """The uint32 threshold under which a Philox draw drops its element: ``round(p * 2**32)``."""
    return min(int(round(float(p) * 2.0**32)), 2**32)


def dropout_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Keep-mask (rows, cols) bool of dropout rate ``p`` for seed ``seed``: True where kept.

    Element (m, k) uses draw ``m * cols + k`` of ``philox_stream``; the keep rate is 1 - p (to 2**-32).
    """
    return (philox_stream(seed, rows * cols, device) >= dropout_threshold(p)).view(rows, cols)


def lora_dropout_ref(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``drop(x)``: x (..., K) with the Philox mask of ``seed`` applied and kept values scaled by 1/(1-p)."""
    return _drop(x, p, seed, dropout_mask)


def _drop(x: torch.Tensor, p: float, seed, mask_fn) -> torch.Tensor:
    """x (..., K) viewed as (M, K), times ``mask_fn(seed, M, K, p, device=)`` (keep-mask), scaled by 1/(1-p)."""
    if p == 0.0:
        return x
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    keep = mask_fn(seed, m, k, p, device=x.device).view(x.shape)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


# ---- the CPU dropout stream ------------------------------------------------------------------------
#
# Philox4x32-10 written as int64 tensor ops costs ~120 passes over M*K/4 words (31 ms for a 2048 x 1024
# mask on 2 cores, 14 ms with every op in place, 12 ms inductor-compiled): more than the LoRA GEMMs it
# guards. The CPU path therefore draws its masks from a cheaper counter-based stream of its own, documented
# here and in the README; it is not the kernels' stream, so the oracle above (``dropout_mask``) stays for
# the kernel tests. SplitMix64 (Steele et al., OOPSLA'14; passes BigCrush) over the word index, keyed by
# the mixed seed, gives 64 random bits per word; each word holds four 16-bit draws. Element e of x as
# (M, K) uses draw e % 4 of word e // 4, read as a signed int16 (bits 16j..16j+15 of the word for draw j),
# and is kept when that draw is >= ``cpu_dropout_threshold(p) - 2**15``: the drop rate is p rounded to a
# multiple of 2**-16. 3 ms for the same mask (13 in-place passes over M*K/4 words plus one compare).

_KERNEL_STREAM_ON_CPU = [False]


@contextlib.contextmanager
def kernel_stream_on_cpu():
    """Inside the block the reference backend on CPU tensors runs the oracle (``lora_linear_ref``,
    ``lora_linear_multi_ref``: the kernels' Philox masks) instead of the CPU path and its stream, so that
    the kernels and the reference backend can be compared bit for bit (tests/test_kernels_*)."""
    prev = _KERNEL_STREAM_ON_CPU[0]
    _KERNEL_STREAM_ON_CPU[0] = True
    try:
        yield
    finally:
        _KERNEL_STREAM_ON_CPU[0] = prev


def use_cpu_stream(x: torch.Tensor) -> bool:
    """Whether the reference backend draws the CPU stream's masks for input ``x``: CPU tensors, outside
    ``kernel_stream_on_cpu`` (where the kernels' Philox stream is drawn, the oracle's)."""
    return x.device.type == "cpu" and not _KERNEL_STREAM_ON_CPU[0]


def func_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is running and ``torch.compile`` is not tracing:
    where autograd Functions without ``setup_context`` fail and host reads of tensor values (``.tolist()``,
    ``nonzero``, storage pointers) cannot be used, so plain compositions with no host sync run instead."""
    return torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()


def tracing_or_transformed() -> bool:
    """Whether torch.compile traces or a torch.func transform runs: tensors may then be fake or functorch-wrapped,
    with no data pointer or version to key a per-call cache on, so the caches of the layers are skipped."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def use_cpu_path(x: torch.Tensor) -> bool:
    """Whether the reference backend runs the CPU path for input ``x``: where it draws the CPU stream
    (``use_cpu_stream``), outside ``torch.func`` transforms (grad, vmap, ...), where plain autograd compositions
    with the same stream run instead: the CPU path's autograd Functions define no ``setup_context`` / vmap rule.
    (Under vmap each sample's mask is drawn for its own shape: with ``randomness="same"`` every sample gets the same
    one, with ``"different"`` each its own, from its own seed.)"""
    return use_cpu_stream(x) and not func_transforms_active()


def _s64(v: int) -> int:
    """A 64-bit pattern as the signed int64 holding it."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= (1 << 63) else v


_SM_GAMMA = _s64(0x9E3779B97F4A7C15)
_SM_MIX = ((30, _s64(0xBF58476D1CE4E5B9)), (27, _s64(0x94D049BB133111EB)), (31, None))


def _splitmix_finalize(z: torch.Tensor, inplace: bool) -> torch.Tensor:
    """SplitMix64's finalizer on an int64 tensor (logical right shifts: arithmetic shift, then mask).
    In place (one scratch buffer, no fresh allocation per pass) when ``inplace``, else out of place (the
    form torch.compile traces); the two give the same bits."""
    t = torch.empty_like(z) if inplace else None
    for shift, mul in _SM_MIX:
        low = (1 << (64 - shift)) - 1
        if inplace:
            torch.bitwise_right_shift(z, shift, out=t)
            z.bitwise_xor_(t.bitwise_and_(low))
            if mul is not None:
                z.mul_(mul)
        else:
            z = z ^ ((z >> shift) & low)
            if mul is not None:
                z = z * mul
    return z


def _splitmix_finalize_int(z: int) -> int:
    """``_splitmix_finalize`` of one 64-bit value in Python's integers (the same bits, as a signed int64): a
    seed's key costs ~1 µs this way against ~18 µs as eleven tensor ops on a one-element tensor, which a decode
    step's mask (a few thousand draws) would pay twice, forward and backward."""
    z &= (1 << 64) - 1
    for shift, mul in _SM_MIX:
        z ^= z >> shift
        if mul is not None:
            z = (z * mul) & ((1 << 64) - 1)
    return _s64(z)


def cpu_dropout_threshold(p: float) -> int:
    """The 16-bit threshold of the CPU stream: ``round(p * 2**16)`` draws of 2**16 drop their element. The rate is
    thus p to 2**-17, while kept values are scaled by 1 / (1 - p): E[drop(x)] = x to 0.05% up to p = 0.99, 0.7% at
    0.999, 7% at 0.9999 (the kernels' Philox stream compares 32 bits: 2**-33)."""
    thr = _THRESHOLDS.get(p)
    if thr is None:
        thr = min(int(round(float(p) * 2.0**16)), 2**16)
        if type(p) is float and len(_THRESHOLDS) < 64:  # a model's few rates (keys that hash alike: floats only)
            _THRESHOLDS[p] = thr
    return thr


_THRESHOLDS: dict = {}


def cpu_draws(seed, n: int, device=None, start: int = 0) -> torch.Tensor:
    """``n`` int16 draws of the CPU stream for flat indices start..start+n-1 (uniform on [-2**15, 2**15)).

    seed: an int in [0, 2**63) or a one-element int64 tensor (a seed drawn inside a compiled region).
    Word w is ``finalize((w + finalize(seed)) * GAMMA)`` (SplitMix64's state sequence, started at
    ``finalize(seed) * GAMMA``; the counter is offset before the multiply so that inductor never folds a
    64-bit constant into an index expression, which overflows); draw e is bits 16j..16j+15 of word e // 4,
    j = e % 4, as a signed int16.
    """
    draws = _numpy_draws(seed, n, device, start)
    if draws is not None:
        return torch.from_numpy(draws)
    compiling = torch.compiler.is_compiling()
    # the form without in-place ops or dtype views: what torch.compile traces, and what runs under torch.func
    # transforms with a tensor seed (drawn per sample under vmap(randomness="different"): a batched key)
    traced = compiling or (isinstance(seed, torch.Tensor) and func_transforms_active())
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(1).to(device=device, dtype=torch.int64)
        key = _splitmix_finalize(_opaque(seed) if compiling else seed, inplace=False)
    elif not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    elif compiling:
        key = torch.tensor([_splitmix_finalize_int(int(seed))], dtype=torch.int64, device=device)  # (a constant)
    else:
        key = _splitmix_finalize_int(int(seed))
    first, lane = start // 4, start % 4  # not divmod: dynamo cannot trace it on symbolic sizes (dynamic=True)
    end = (start + n + 3) // 4
    words = torch.arange(first, end, device=device, dtype=torch.int64)
    if traced:
        # No dtype views of another item size under compile: each 16-bit lane shifted down by a constant and
        # masked, then made signed, the very bits the little-endian view below reads. Not by a tensor of shift
        # amounts (`(w[:, None] << (48 - lanes)) >> 48`, as before 2026-12-01): fused with the finalizer, inductor
        # on the CPU (torch 2.13) computed that as 0 / -1 / 32767, a mask keeping every element (no dropout).
        words = words + key
        words = _splitmix_finalize((_opaque(words) if compiling else words) * _SM_GAMMA, inplace=False)
        v = torch.stack([(words >> shift) & 0xFFFF for shift in (0, 16, 32, 48)], 1)
        v = torch.where(v >= 2**15, v - 2**16, v)
        return v.reshape(-1)[lane:lane + n].to(torch.int16)
    words = _splitmix_finalize(words.add_(key).mul_(_SM_GAMMA), inplace=True)
    return words.view(torch.int16)[lane:lane + n]


def _opaque(t: torch.Tensor) -> torch.Tensor:
    """``t | 0``: the same int64 values, which inductor holds as loaded values rather than folding them with constants
    (a constant seed or key) into index expressions or literals. Its folding computes in Python integers, without
    int64's wrap-around: with a constant key the stream came out wrong (torch 2.13: every draw) or overflowed
    converting to int64 at compile time."""
    return t.bitwise_or(torch.zeros(1, dtype=torch.int64, device=t.device))


# Up to this many words (4 draws each) numpy computes the stream: ~1 µs an op against torch's ~1.5-3 µs, and below
# 32768 elements torch's element-wise ops run on one thread anyway (its grain size). A 1 x 1024 mask: 6 µs
# against 21; 64 Ki draws: 26 against 54 µs (2 threads).
_NUMPY_MAX_WORDS = 1 << 15
_NP_MIX = tuple((np.uint64(shift), None if mul is None else np.uint64(mul % (1 << 64))) for shift, mul in _SM_MIX)
_NP_GAMMA = np.uint64(_SM_GAMMA % (1 << 64))
_GAMMA_INT, _MASK64 = _SM_GAMMA % (1 << 64), (1 << 64) - 1


def _numpy_draws(seed, n: int, device, start: int) -> np.ndarray | None:
    """``cpu_draws(seed, n, device, start)`` as an int16 numpy array where numpy computes them (an int seed in
    range, outside torch.compile, for the CPU (``device`` None: torch's default), up to ``_NUMPY_MAX_WORDS``
    words), else None: ``cpu_keep_mask`` compares them in numpy too."""
    if type(seed) is not int:  # an int (the eager case) skips the checks' isinstance
        if isinstance(seed, torch.Tensor):
            return None
        seed = int(seed)
    if not 0 <= seed < 2**63 or torch.compiler.is_compiling():
        return None
    first, lane = divmod(int(start), 4)
    end = (start + n + 3) // 4
    if end - first > _NUMPY_MAX_WORDS:
        return None
    if device is None:
        device = torch.get_default_device()
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cpu":
        return None
    return _cpu_draws_numpy(_splitmix_finalize_int(seed), first, end)[lane:lane + n]


_NP_STATES: list = []  # [words 0.._NUMPY_MAX_WORDS-1 times GAMMA], built at the first draw


def _cpu_draws_numpy(key: int, first: int, end: int) -> np.ndarray:
    """The draws of words first..end-1 (``cpu_draws``' stream, the same bits) as an int16 array, computed by
    numpy in uint64 (logical shifts and wrapping products: SplitMix64 as written), for a key given as an int.
    The states (w + key) GAMMA are w GAMMA + key GAMMA (mod 2**64): below ``_NUMPY_MAX_WORDS`` the w GAMMA are a
    kept table (256 KiB), one add instead of an arange, an add and a product (~1 µs of a decode step's ~5)."""
    if end <= _NUMPY_MAX_WORDS:
        if not _NP_STATES:
            _NP_STATES.append(np.arange(_NUMPY_MAX_WORDS, dtype=np.uint64) * _NP_GAMMA)
        w = _NP_STATES[0][first:end] + np.uint64((key * _GAMMA_INT) & _MASK64)
    else:
        w = np.arange(first, end, dtype=np.uint64)
        w += np.uint64(key % (1 << 64))
        w *= _NP_GAMMA
    t = np.empty_like(w)
    for shift, mul in _NP_MIX:
        np.right_shift(w, shift, out=t)
        w ^= t
        if mul is not None:
            w *= mul
    return w.view(np.int16)


def cpu_keep_mask(seed, rows: int, cols: int, p: float, device=None, row0: int = 0) -> torch.Tensor:
    """Keep-mask (rows, cols) bool of the CPU stream at drop rate ``p`` (to 2**-16): True where kept.
    ``row0``: the mask of rows row0..row0+rows-1 of a larger (M, cols) mask (drawn by pieces)."""
    n, start = rows * cols, row0 * cols
    thr = cpu_dropout_threshold(p) - 2**15
    if thr >= 2**15:  # p >= 1 - 2**-17: every element dropped (an int16 comparison with 2**15 would wrap)
        return torch.zeros(rows, cols, dtype=torch.bool, device=device)
    draws = _numpy_draws(seed, n, device, start)
    if draws is not None:  # a decode step's mask: the comparison in numpy too, ~8 µs for 1 x 1024 against ~13
        return torch.from_numpy(draws >= thr).view(rows, cols)
    draws = cpu_draws(seed, n, device, start=start)
    return (draws >= thr).view(rows, cols)


def lora_dropout_cpu(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """``drop(x)`` with the CPU stream's mask: x (..., K), kept values scaled by 1/(1-p)."""
    return _drop(x, p, seed, cpu_keep_mask)


def _stream_mask_fn(x: torch.Tensor, cpu: bool | None):
    """The mask function of the reference backend's stream for x: ``cpu_keep_mask`` on the CPU path
    (``use_cpu_stream``), ``dropout_mask`` (the kernels' Philox stream) elsewhere. ``cpu``: the stream a forward
    chose, so that its backward redraws that one (None: decide now)."""
    return cpu_keep_mask if (use_cpu_stream(x) if cpu is None else cpu) else dropout_mask


def keep_mask_stream(x: torch.Tensor, p: float, seed, cpu: bool | None = None) -> torch.Tensor:
    """The keep-mask (bool, x's shape) of x (..., K) as the reference backend draws it (``cpu``: see
    ``_stream_mask_fn``)."""
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    return _stream_mask_fn(x, cpu)(seed, m, k, p, device=x.device).view(x.shape)


def conv_keep_mask(x: torch.Tensor, p: float, seed, cpu: bool | None = None) -> torch.Tensor:
    """The keep-mask (bool, x's shape) of the convolution ops' dropout: on a CUDA device with an int seed, torch's own
    Philox generator seeded with it (one kernel; the kernels' stream written in torch ops, ``dropout_mask``, costs
    ~130 passes over x there, where no fused kernel of ours draws the mask); else ``keep_mask_stream`` (a tensor seed,
    drawn while compiling or capturing a CUDA graph: inductor fuses those ops into one kernel)."""
    if x.is_cuda and isinstance(seed, int) and not (use_cpu_stream(x) if cpu is None else cpu):
        gen = torch.Generator(device=x.device)
        gen.manual_seed(seed)
        return torch.rand(x.shape, generator=gen, device=x.device) >= p
    return keep_mask_stream(x, p, seed, cpu=cpu)


def conv_dropout(x: torch.Tensor, p: float, seed, cpu: bool | None = None) -> torch.Tensor:
    """``drop(x)`` of the convolution ops' compositions: ``conv_keep_mask``'s mask, kept values scaled by 1/(1-p)."""
    return x * conv_keep_mask(x, p, seed, cpu=cpu).to(x.dtype) * (1.0 / (1.0 - p))


def lora_dropout_stream(x: torch.Tensor, p: float, seed, cpu: bool | None = None) -> torch.Tensor:
    """``drop(x)`` as the reference backend draws it for ``x`` (``keep_mask_stream``'s mask)."""
    return _drop(x, p, seed, _stream_mask_fn(x, cpu))


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
    *,
    cpu_stream: bool = False,
) -> torch.Tensor:
    """``y = x W^T + b + scaling * (drop(x) A^T) B^T``, the LoRA linear layer in plain PyTorch.

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_A: (r, in); lora_B: (out, r).
    Returns (..., out). Dropout (rate ``dropout_p``, mask from ``seed``) touches the LoRA branch only
    and only when ``training``; ``seed`` is required then. Differentiable through torch autograd, which
    stores the dropped copy of x: this is the oracle, not the memory-lean path. The mask is the kernels'
    Philox stream, or with ``cpu_stream`` the CPU path's (what runs under torch.func transforms on the CPU).
    """
    base = F.linear(x, weight, bias)
    if training and dropout_p > 0.0:
        if seed is None:
            raise ValueError("seed is required when training with dropout_p > 0, got None")
        x = lora_dropout_stream(x, dropout_p, seed, cpu=cpu_stream)
    lora = F.linear(F.linear(x, lora_A), lora_B)
    return base + scaling * lora


def lora_conv_ref(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, training: bool = True,
                  seed=None, stride=1, padding=0, dilation=1, *, cpu_stream: bool = False) -> torch.Tensor:
    """``y = conv(x, W) + b + scaling * conv1x1(conv(drop(x), A), B)``, PEFT's LoRA convolution in plain PyTorch.

    x: (N, C, *S) (or unbatched (C, *S)) with 1-3 spatial dims; weight (O, C, *k); bias (O,) or None; lora_A
    (r, C, *k); lora_B (O, r).
    The base convolution takes ``stride``, ``padding`` (ints, tuples, ``"same"`` / ``"valid"``) and ``dilation``; A's
    the same, dilation included (PEFT's A takes the base's kernel size, stride and padding but dilation 1: the same
    where the dilation is 1 or the kernel 1 wide; ``FastLoRAConv`` computes the other case by PEFT's composition).
    Dropout's mask: ``conv_keep_mask``'s. Autograd keeps drop(x): this is the oracle, not the memory-lean path."""
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    base = conv(x, weight, bias, stride, padding, dilation)
    if training and dropout_p > 0.0:
        if seed is None:
            raise ValueError("seed is required when training with dropout_p > 0, got None")
        x = conv_dropout(x, dropout_p, seed, cpu=cpu_stream)
    u = conv(x, lora_A, None, stride, padding, dilation)
    return base + scaling * conv(u, lora_B.view(*lora_B.shape, *(1,) * (weight.dim() - 2)))


def lora_linear_multi_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor | None = None,
    dropout_p: torch.Tensor | None = None,
    training: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """Many adapters in one batch: row m gets ``s_i (drop_i(x_m) A_i^T) B_i^T`` with i = adapter_ids[m].

    x: (..., in); adapter_ids: int tensor of shape x.shape[:-1], values in [-1, n) (-1 = base only);
    lora_A_stack: (n, r_max, in); lora_B_stack: (n, out, r_max); scalings: (n,); ranks: (n,) or None
    (adapter i uses its first ranks[i] rows of A and columns of B); dropout_p: (n,) rates or None.
    Returns (..., out), differentiable through torch autograd. Dropout masks are those of
    ``lora_dropout_ref`` for the whole x (position (m, k) of x as (M, K)), at each row's own rate.
    The update is ``multi_lora_add``'s: rows grouped by adapter in eager mode, the host-sync-free form
    while torch.compile traces.
    """
    return _multi(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks, dropout_p, training,
                  seed, _row_dropout_ref)


def lora_linear_multi_cpu(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks=None,
                          dropout_p=None, training=True, seed=None) -> torch.Tensor:
    """``lora_linear_multi_ref`` with the CPU dropout stream (``cpu_keep_mask`` at each row's rate): the
    reference backend on CPU tensors, where the kernels' Philox stream costs more than the GEMMs."""
    return _multi(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks, dropout_p, training,
                  seed, _row_dropout_cpu)


def _multi(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks, dropout_p, training, seed,
           row_dropout):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    ids = adapter_ids.reshape(-1)
    y = F.linear(x2, weight, bias)
    n = lora_A_stack.shape[0]
    if training and dropout_p is not None and n:
        if seed is not None:
            x2 = row_dropout(x2, dropout_p[ids.clamp(min=0)], seed)
        elif bool((dropout_p > 0).any()):
            raise ValueError("seed is required when training with dropout > 0, got None")
    y = multi_lora_add(y, x2, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks)
    return y.view(*x.shape[:-1], weight.shape[0])


def multi_lora_add(y: torch.Tensor, xd: torch.Tensor, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks=None):
    """``y`` (M, N) plus each row's update ``s_i (xd_m A_i^T) B_i^T`` (i = adapter_ids[m], none for -1);
    xd (M, K) is x already dropped. adapter_ids: any shape of M elements (its rows flattened).

    Eager: the rows are grouped by adapter (one stable sort of the ids, cached while the same ids tensor
    comes back unchanged, as ``mixed_batch`` routing does in a generation loop), each present adapter
    runs once on its own rows at its own rank (views A_i[:r_i], B_i[:, :r_i]), and one ``index_add`` puts
    the updates back: the cost follows the rows, not the number of adapters. When all of at least
    ``_BATCHED_MIN_GROUPS`` adapters have rows at the full rank, they run together in two batched products
    (``_batched_lora_add``). While torch.compile traces (no host sync, no data-dependent shapes): every
    adapter's update is computed for every row at r_max and kept where the row is its own, the ranks zeroing
    the columns past them in u and B (not a multiply by 0: 0 * inf is nan); under ``torch.func`` transforms too.
    Eager and compiled forms agree to the order of the sums; the eager form never reads past a rank, the compiled
    one masks what it reads there.
    """
    n, r_max = lora_A_stack.shape[0], lora_A_stack.shape[1]
    if torch.compiler.is_compiling() or func_transforms_active():
        ids, cols = adapter_ids.reshape(-1), torch.arange(r_max, device=xd.device)
        for i in range(n):
            b, u = lora_B_stack[i], F.linear(xd, lora_A_stack[i])
            if ranks is not None:
                in_rank = cols < ranks[i]
                u, b = torch.where(in_rank, u, 0.0), torch.where(in_rank, b, 0.0)
            y = torch.where((ids == i)[:, None], y + scalings[i] * F.linear(u, b), y)
        return y
    order, groups, runs = row_groups(adapter_ids, n)
    if not groups:  # no row has an adapter: zero gradients for the stacks (an empty sum), as the where-form
        return y + (lora_A_stack[:0].sum() + lora_B_stack[:0].sum()).to(y.dtype)
    rk = [r_max] * n if ranks is None else [max(0, min(int(r), r_max)) for r in ranks.tolist()]
    rows, width = groups[-1][2], max(stop - start for _, start, stop in groups)
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (y, xd, lora_A_stack, lora_B_stack))
    in_place = runs is not None and not tracked
    if len(groups) == n >= _BATCHED_MIN_GROUPS and min(rk) == r_max and (
            n * width <= 2 * rows or n * width - rows <= _BATCHED_PAD_PER_ADAPTER * n) and not (
            in_place and width > _BATCHED_MAX_RUN):
        return _batched_lora_add(y, xd, lora_A_stack, lora_B_stack, scalings, order, groups, width)
    # Each adapter at its own rank, on views of the stacks (A_i[:r_i], B_i[:, :r_i]: no mask, no copy, no
    # product over the padding). With gradients and most adapters present the stacks are unbound once, so that
    # a backward builds each stack's gradient in one piece instead of a zero stack per adapter (64 adapters:
    # 29 -> 7 ms on this CPU); otherwise indexed per present adapter (unbinding costs ~0.7 us per loaded one).
    if tracked and 2 * len(groups) > n:
        a_views, b_views = lora_A_stack.unbind(0), lora_B_stack.unbind(0)
    else:
        a_views, b_views = lora_A_stack, lora_B_stack

    def at_rank(i):  # adapter i's A and B at its rank (a slice only below r_max: one op fewer each)
        if rk[i] == r_max:
            return a_views[i], b_views[i]
        return a_views[i][:rk[i]], b_views[i][:, :rk[i]]
    if in_place or (runs is not None and len(groups) == 1 and runs[0] == 0 and groups[0][2] == y.shape[0]):
        # Each adapter's rows are one contiguous run (one adapter for the whole batch, or per-sequence
        # routing in a generation loop): read them as views and add in place, no gather, no M x N
        # temporary. Only without autograd, or for a run of all rows (in-place updates of many views of y
        # would each copy dY in backward).
        scal = scalings.tolist()
        for (i, start, stop), row0 in zip(groups, runs):
            part = slice(row0, row0 + stop - start)
            a, b = at_rank(i)
            y[part].addmm_(F.linear(xd[part], a).to(y.dtype), b.t().to(y.dtype), alpha=scal[i])
        return y
    xs = xd.index_select(0, order)
    updates = []
    for i, start, stop in groups:
        a, b = at_rank(i)
        updates.append(scalings[i] * F.linear(F.linear(xs[start:stop], a), b))
    delta = updates[0] if len(updates) == 1 else torch.cat(updates)
    return y.index_add_(0, order, delta.to(y.dtype))


# From this many adapters, when every one has rows and all have the full rank r_max, multi_lora_add batches them
# (``_batched_lora_add``) instead of a loop of per-adapter products, if padding every group to the largest at
# most doubles the rows or adds at most _BATCHED_PAD_PER_ADAPTER rows per adapter (a decode step: tokens spread
# unevenly over the adapters), and, without gradients, no adapter's rows are one run longer than
# _BATCHED_MAX_RUN (per-sequence prefill: the loop reads such runs in place, with no gather and no copy). With a
# subset of the adapters, or several ranks, the batch would need copies of the stacks' slices, which cost more
# than the loop's views.
_BATCHED_MIN_GROUPS = 4
_BATCHED_PAD_PER_ADAPTER = 4
_BATCHED_MAX_RUN = 32


def _batched_lora_add(y, xd, lora_A_stack, lora_B_stack, scalings, order, groups, width: int):
    """``multi_lora_add``'s update when every one of the n adapters has rows (``row_groups``' ``order`` and
    ``groups``, in adapter order) at the full rank, in two batched products on the stacks themselves: the rows of
    adapter g go to slots g*width.. of a zero-padded (n, width, K) copy of xd, u = xg Aᵀ (n, width, r), the
    update s_g u B_gᵀ, put back by one ``index_add``. Per row the same products as the loop; a decode step's 64
    adapters of one row each: one pair of batched products instead of 64 pairs of small ones (4x faster on
    this CPU)."""
    n, rows, dev = len(groups), order.shape[0], xd.device
    offsets = torch.tensor([g * width - start for g, (_, start, _) in enumerate(groups)], device=dev)
    counts = torch.tensor([stop - start for _, start, stop in groups], device=dev)
    slot = torch.arange(rows, device=dev) + offsets.repeat_interleave(counts, output_size=rows)
    xg = xd.new_zeros(n * width, xd.shape[1]).index_copy_(0, slot, xd.index_select(0, order))
    u = torch.bmm(xg.view(n, width, -1), lora_A_stack.transpose(1, 2))
    upd = torch.bmm(u, lora_B_stack.transpose(1, 2)).mul_(scalings.view(-1, 1, 1))  # in place: as the loop's dtype
    return y.index_add_(0, order, upd.view(n * width, -1).index_select(0, slot).to(y.dtype))


_GROUPS_CACHE: dict = {}
_GROUPS_CACHE_SIZE = 8


def row_groups(adapter_ids: torch.Tensor, n: int) -> tuple:
    """``(order, groups, runs)``: ``order`` (M',) int64 the rows with an adapter, sorted by adapter
    (stable); ``groups`` a list of ``(adapter, start, stop)`` for each adapter with rows, its slice of
    ``order``; ``runs`` the first row of each group when every group's rows are one contiguous run
    (``order[start:stop]`` = ``run, run + 1, ...``), else None.

    Cached on the ids tensor's storage, offset, shape, strides and version counter (so an in-place change
    of the ids is seen); the cache holds the ids tensor itself, so its storage cannot be reused by another
    tensor while the entry lives. A few entries (prefill and decode shapes of a generation loop). Not for ids
    made in ``torch.inference_mode``: an inference tensor has no version counter (fastpeft's own routing ids are
    made outside it, ``ops.common.outside_inference_mode``).
    """
    key = None if adapter_ids.is_inference() else (
        adapter_ids.untyped_storage().data_ptr(), adapter_ids.storage_offset(), tuple(adapter_ids.shape),
        adapter_ids.stride(), adapter_ids._version, adapter_ids.device, n)
    hit = _GROUPS_CACHE.get(key) if key is not None else None
    if hit is not None:
        return hit[1:]
    ids = adapter_ids.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=n + 1).tolist()  # one host read: the group sizes
    skip = counts[0]  # rows of id -1 sort first
    groups, start = [], 0
    for i, c in enumerate(counts[1:]):
        if c:
            groups.append((i, start, start + c))
            start += c
    order = order[skip:]
    runs = None
    if groups:
        # Contiguous runs: within each group the sorted rows step by 1 (one more host read).
        step_ok = order[1:] - order[:-1] == 1
        step_ok[[g[1] - 1 for g in groups[1:]]] = True  # a step from one group into the next is free
        runs = order[[g[1] for g in groups]].tolist() if bool(step_ok.all()) else None
    if key is None:
        return order, groups, runs
    if len(_GROUPS_CACHE) >= _GROUPS_CACHE_SIZE:
        _GROUPS_CACHE.pop(next(iter(_GROUPS_CACHE), None), None)  # two threads may evict the same entry
    _GROUPS_CACHE[key] = (adapter_ids, order, groups, runs)
    return order, groups, runs


def _row_dropout_ref(x2: torch.Tensor, p_rows: torch.Tensor, seed) -> torch.Tensor:
    """``drop(x)`` of x2 (M, K) with row m at rate ``p_rows[m]`` (a tensor: no host sync): the mask of
    ``dropout_mask`` (threshold ``round(p * 2**32)``, computed in float64 where p * 2**32 is exact) and
    kept values scaled by 1/(1-p), rounded once to x's dtype as ``lora_dropout_ref`` does."""
    m, k = x2.shape
    p = p_rows.to(device=x2.device, dtype=torch.float64)
    thr = torch.round(p * 2.0**32).clamp(max=2.0**32).to(torch.int64)
    keep = philox_stream(seed, m * k, x2.device).view(m, k) >= thr[:, None]
    return _scale_rows(x2, keep, p)


def _row_dropout_cpu(x2: torch.Tensor, p_rows: torch.Tensor, seed) -> torch.Tensor:
    """``_row_dropout_ref`` with the CPU stream: row m keeps draw >= round(p_m * 2**16) - 2**15."""
    m, k = x2.shape
    p = p_rows.to(device=x2.device, dtype=torch.float64)
    thr = torch.round(p * 2.0**16).clamp(max=2.0**16).to(torch.int64) - 2**15
    keep = cpu_draws(seed, m * k, x2.device).view(m, k) >= thr[:, None]
    return _scale_rows(x2, keep, p)


def _scale_rows(x2, keep, p):
    scale = (1.0 / (1.0 - p)).to(torch.float64 if x2.dtype == torch.float64 else torch.float32)
    return (x2 * keep.to(x2.dtype) * scale[:, None]).to(x2.dtype)


def dense_delta_ref(delta_indices: torch.Tensor, delta_values: torch.Tensor, out_features: int, in_features: int,
                    block_size: int = 1) -> torch.Tensor:
    """The sparse delta as a dense (out, in) tensor of ``delta_values``' dtype (differentiable in values).

    block_size 1: delta_indices (nnz,) flat row-major indices into (out, in), delta_values (nnz,).
    block_size b > 1: delta_indices (nblocks, 2) block (row, col) in units of b, delta_values (nblocks, b, b);
    blocks on the bottom / right edge are clipped to the matrix (their outside values are unused).
    """
    b = block_size
    if b == 1:
        flat = delta_values.new_zeros(out_features * in_features)
        flat = flat.index_put((delta_indices.long(),), delta_values)
        return flat.view(out_features, in_features)
    rb, cb = -(-out_features // b), -(-in_features // b)
    grid = delta_values.new_zeros(rb, cb, b, b)
    grid = grid.index_put((delta_indices[:, 0].long(), delta_indices[:, 1].long()), delta_values)
    return grid.permute(0, 2, 1, 3).reshape(rb * b, cb * b)[:out_features, :in_features]


def sparse_delta_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            delta_indices: torch.Tensor, delta_values: torch.Tensor, block_size: int = 1) -> torch.Tensor:
    """``y = x (W + Δ)^T + b`` with Δ sparse (see ``dense_delta_ref``); x (..., in) -> (..., out).

    Clones W and scatters Δ into it (the PEFT-SHiRA / RoSA way): the oracle, not the lean path.
    """
    out_f, in_f = weight.shape
    delta = dense_delta_ref(delta_indices, delta_values, out_f, in_f, block_size)
    return F.linear(x, weight + delta.to(weight.dtype), bias)


def lora_sparse_linear_ref(x, weight, bias, lora_A, lora_B, scaling, delta_indices, delta_values, block_size=1,
                           dropout_p=0.0, training=True, seed=None, *, cpu_stream=False) -> torch.Tensor:
    """LoRA and a sparse delta together (RoSA): ``y = x (W + Δ)^T + b + s (drop(x) A^T) B^T``; ``cpu_stream`` as in
    ``lora_linear_ref``."""
    out_f, in_f = weight.shape
    delta = dense_delta_ref(delta_indices, delta_values, out_f, in_f, block_size)
    return lora_linear_ref(x, weight + delta.to(weight.dtype), bias, lora_A, lora_B, scaling, dropout_p, training,
                           seed, cpu_stream=cpu_stream)


# ----------------------------------------------------------------------------------------------------
# DoRA (Liu et al. 2024), with the semantics of PEFT 0.21's DoraLinearLayer / DoraLinearVariant
# ----------------------------------------------------------------------------------------------------

DORA_DROPOUT_MODES = ("exact", "lora_only")


def dora_norm_ref(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖W_j + s B_j A‖₂`` for every output row j, detached: (out,) in fp32 (fp64 for fp64 inputs).

    Forms the (out, in) matrix ``W + s B A`` in fp32 as PEFT does (``get_weight_norm``): the oracle only.
    """
    dt = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        w = weight.to(dt) + scaling * (lora_B.to(dt) @ lora_A.to(dt))
        return torch.linalg.vector_norm(w, dim=1)


def dora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
    dropout_mode: str = "exact",
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA linear in plain PyTorch: with ``g = m / ‖W + sBA‖_row`` (fp32, the norm detached) and
    ``x̃ = drop(x)`` (only when ``training`` and ``dropout_p > 0``; ``lora_dropout_stream``: the mask the
    reference backend draws),

    - no dropout (eval, or p = 0):  ``y = g ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b``
    - ``dropout_mode="exact"`` (PEFT 0.21's DoraLinearVariant.forward: with dropout it feeds ``x̃`` to the
      DoRA term and keeps the base layer's output on x):
      ``y = x Wᵀ + b + (g − 1) ⊙ (x̃ Wᵀ) + g ⊙ (s x̃ Aᵀ Bᵀ)``
    - ``dropout_mode="lora_only"`` (opt-in, cheaper: one GEMM on x as in eval):
      ``y = g ⊙ (x Wᵀ + s x̃ Aᵀ Bᵀ) + b``

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_A: (r, in); lora_B: (out, r);
    magnitude: (out,). Returns (..., out) in x's dtype; g and the combination are in fp32 (never g folded
    into a low-precision copy of W). Differentiable through torch autograd (the oracle, not the lean path).
    ``norm``: ‖W + sBA‖_row (out,) computed by the caller (detached), ``dora_norm_ref``'s when None.
    """
    if dropout_mode not in DORA_DROPOUT_MODES:
        raise ValueError(f"dropout_mode must be one of {DORA_DROPOUT_MODES}, got {dropout_mode!r}")
    dt = torch.promote_types(x.dtype, torch.float32)
    n = (dora_norm_ref(weight, lora_A, lora_B, scaling) if norm is None else norm.detach()).to(dt)
    g = magnitude.to(dt) / n
    dropped = training and dropout_p > 0.0
    if dropped and seed is None:
        raise ValueError("seed is required when training with dropout_p > 0, got None")
    # the reference backend's stream: the CPU one on the CPU path (what fastpeft's DoRA and QLoRA draw there)
    xd = lora_dropout_stream(x, dropout_p, seed) if dropped else x
    base = F.linear(x, weight).to(dt)
    lora = scaling * F.linear(F.linear(xd, lora_A), lora_B).to(dt)
    if dropped and dropout_mode == "exact":
        y = base + (g - 1.0) * F.linear(xd, weight).to(dt) + g * lora
    else:
        y = g * (base + lora)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype)


def lora_grouped_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group_sizes,
                            lora_A_stacks=(), lora_B_stacks=(), scalings=(), transposed: bool = False,
                            row_masks=None) -> torch.Tensor:
    """A linear layer per group of rows, each with its own LoRA update (a mixture of experts' expert weights).

    The rows of x come grouped: rows ``[o_e, o_e + n_e)`` (``n_e = group_sizes[e]``, ``o_e`` their running sum) use
    group e, and get ``x W_eᵀ + b_e + Σ_a s_a (x A_{a,e}ᵀ) B_{a,e}ᵀ`` (one term per adapter a).

    x: (S, in) with S = Σ n_e; weight: (E, out, in), or (E, in, out) when ``transposed`` (the row computes x W_e);
    bias: (E, out) or None; group_sizes: E ints; lora_A_stacks: a sequence of (E, r_a, in); lora_B_stacks: the
    same number of (E, out, r_a); scalings: their floats; row_masks: None, or one (S,) 0/1 tensor (or None: every
    row) per adapter, the rows that adapter's term reaches (many adapters in one batch: each computed for every row
    of the group, its u masked). Returns (S, out), differentiable through torch autograd.
    The factors are cast to W's dtype (PEFT's ``ParamWrapper`` folds them into W in that dtype). No (E, out, in)
    temporary: a group costs its own rows' products, the update ``s (x Aᵀ) Bᵀ`` of rank r beside the base one.
    """
    sizes = [int(n) for n in group_sizes]
    dt = weight.dtype
    tracked = torch.is_grad_enabled()
    # a stack read one group at a time through unbind when autograd tracks it: the backward then builds each stack's
    # gradient in one piece, where indexing would make a zero (E, ...) gradient per group
    def per_group(t):
        return t.unbind(0) if tracked and t.requires_grad else t
    ws = per_group(weight)
    bs = None if bias is None else per_group(bias)
    factors = [(per_group(a.to(dt)), per_group(b.to(dt)), float(s))
               for a, b, s in zip(lora_A_stacks, lora_B_stacks, scalings, strict=True)]
    masks = [None] * len(factors) if row_masks is None else [
        None if m is None else m.to(dt).split(sizes) for m in row_masks]
    if len(masks) != len(factors):
        raise ValueError(f"row_masks must have one entry per adapter ({len(factors)}), got {len(masks)}")

    def group(e, xe):
        y = xe @ ws[e] if transposed else F.linear(xe, ws[e])
        if bs is not None:
            y = y + bs[e]
        for (a, b, s), m in zip(factors, masks):
            u = F.linear(xe, a[e])
            if m is not None:
                if not bool(m[e].any()):
                    continue  # (no row of this group has the adapter)
                u = u * m[e].unsqueeze(1)
            y = torch.addmm(y, u, b[e].t(), alpha=s)
        return y
    # split, not slices: its backward writes the rows' gradients once, where each slice's would fill an (S, in) zero
    outs = [group(e, xe) for e, (n, xe) in enumerate(zip(sizes, x.split(sizes))) if n]
    if not outs:  # no rows: group 0 on none, a (0, out) result in the graph
        return group(0, x[:0])
    return outs[0] if len(outs) == 1 else torch.cat(outs)
