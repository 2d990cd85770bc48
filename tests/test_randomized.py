"""Randomized agreement: every op's triton backend against the pure-PyTorch reference, forward and every
gradient, over cases drawn by hypothesis: odd and 1-row shapes, ranks 1..24, fp32 / bf16 / fp16, dropout
with a drawn seed, bias on / off, strided / transposed / broadcast inputs, which inputs require grad,
adapter-id patterns and ranks (``lora_linear_multi``), sparse patterns and block sizes (``sparse_delta_linear``,
``lora_sparse_linear``) and the kernels' GEMM / SDDMM variants.

Oracle: the reference run in float64 on the inputs rounded to the case's dtype. fp32 must be close to it
(rtol 1e-5, atol 1e-5 x the largest value); fp16 / bf16 must be at most 2x as far from it as the reference
run in that dtype, plus finfo(dtype).eps x the largest value (about one unit in the last place there: 1e-3
relative for fp16, 8e-3 for bf16). That ulp is the slack for an implementation that rounds once more or in another
order than PyTorch: with few output elements (one row, K=5) PyTorch's max error can be a lucky 0.3 ulp where
an equally sound order gives 1.3 ulp (bf16 dX of the cuBLAS + low-rank-update variant, rounded twice as the
reference's dx_base + dx_lora is). Runs under TRITON_INTERPRET=1 on CPU tensors (and on CUDA where present).

Profiles (registered in tests/conftest.py): ``ci``, the default, bounded and derandomized; ``long``:
``pytest --hypothesis-profile=long tests/test_randomized.py``. A failure prints the drawn case, its id
(``lora-M33-K80-N48-r16-bf16-p0.1-...``) and a ``@reproduce_failure`` blob; the case's repr rebuilds it, and
``test_lora_linear_agrees.hypothesis.inner_test(Case(...))`` reruns that one case alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("hypothesis")

from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastpeft  # noqa: E402
from conftest import assert_close_report, triton_backend_device  # noqa: E402

# The kernels are compared with the reference backend: on CPU tensors it must draw the kernels' Philox masks
# (the oracle), not the CPU path's own stream.
pytestmark = pytest.mark.usefixtures("kernel_stream_reference")
from fastpeft.functional import lora_sparse_linear, sparse_delta_linear  # noqa: E402

DEV = triton_backend_device()

from fastpeft.ops.sparse import build_sparse_plan  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROWS = [1, 7, 13, 33, 61]
FEATURES = [5, 17, 48, 80, 97, 130]
SCALINGS = [1.0, 0.5, 2.0, 0.0, -1.5, 16 / 3]
RATES = [0.0, 0.1, 0.5]
MAX_ENTRIES, MAX_BLOCKS = 600, 40  # nnz caps of a drawn sparse delta (entries for block_size 1, else blocks)
# How x is laid out in memory (see _x_source); "T" needs 2-D x, "leadT" 3-D x.
LAYOUTS_2D = ["contig", "T", "sliced", "stride2", "broadcast"]
LAYOUTS_3D = ["contig", "leadT", "sliced", "stride2", "broadcast"]


# ---- drawn cases --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn call. Its repr rebuilds it; ``id`` is the short readable name used in messages."""
    op: str
    lead: tuple              # x.shape[:-1]
    k: int                   # in_features
    n: int                   # out_features
    dt: str
    layout: str              # x's memory layout
    bias: bool
    grads: tuple             # names of the inputs that require grad
    data_seed: int
    # LoRA (lora_linear, lora_sparse_linear)
    r: int = 0
    scaling: float = 1.0
    p: float = 0.0
    training: bool = True
    seed: int = 0            # dropout seed
    lora_gemm: str = "auto"  # FASTPEFT_LORA_GEMM
    # many adapters (lora_linear_multi)
    ranks: tuple = ()        # per adapter
    ranks_given: bool = True  # False: ranks=None (all adapters use r_max)
    rates: tuple = ()        # per-adapter dropout rates, () = dropout_p None
    ids_pattern: str = ""
    per_seq: bool = False
    ids_dtype: str = "int64"
    # sparse delta (sparse_delta_linear, lora_sparse_linear)
    block: int = 1
    nnz: int = 0
    corner: bool = False     # always include the last (clipped) entry / block
    idx_dtype: str = "int64"
    plan: str = "none"       # "none" | "built" | "tile32" | "tile64"
    sparse_gemm: str = "auto"   # FASTPEFT_SPARSE_GEMM
    sddmm: str = "auto"         # FASTPEFT_SPARSE_SDDMM

    @property
    def id(self) -> str:
        rows = "x".join(map(str, self.lead))
        parts = [self.op, f"M{rows}-K{self.k}-N{self.n}"]
        if self.op in ("lora", "rosa"):
            parts.append(f"r{self.r}")
        if self.op == "multi":
            parts.append("r" + ".".join(map(str, self.ranks)) + ("" if self.ranks_given else "(None)"))
        parts.append(self.dt)
        if self.op in ("lora", "rosa"):
            parts += [f"p{self.p}" + ("" if self.training else "(eval)"), f"s{self.scaling:g}", f"seed{self.seed}",
                      f"lora_gemm:{self.lora_gemm}"]
        if self.op == "multi":
            parts += ["p" + (".".join(map(str, self.rates)) if self.rates else "None")
                      + ("" if self.training else "(eval)"), f"seed{self.seed}",
                      f"ids:{self.ids_pattern}{'-per_seq' if self.per_seq else ''}-{self.ids_dtype}"]
        if self.op in ("sparse", "rosa"):
            parts += [f"b{self.block}-nnz{self.nnz}" + ("-corner" if self.corner else ""), self.idx_dtype,
                      f"plan:{self.plan}", f"gemm:{self.sparse_gemm}", f"sddmm:{self.sddmm}"]
        parts += ["bias" if self.bias else "nobias", f"x:{self.layout}", "grads:" + ("+".join(self.grads) or "none"),
                  f"data{self.data_seed}"]
        return "-".join(parts)


@st.composite
def _common(draw, op: str, trainable: tuple) -> dict:
    """Shape, dtype, layout, bias, which inputs require grad, data seed: the fields every op has."""
    rows = draw(st.sampled_from(ROWS))
    lead = (rows,) if draw(st.booleans()) else (draw(st.sampled_from([1, 2, 3])), rows)
    k, n = draw(st.sampled_from(FEATURES)), draw(st.sampled_from(FEATURES))
    bias = draw(st.booleans())
    if not bias:
        trainable = tuple(t for t in trainable if t != "b")
    # Mostly every gradient; sometimes the frozen base's too (bias="all", full fine-tuning); sometimes any
    # subset (x frozen in a first layer, A or B frozen), which takes other branches of the backward.
    mode = draw(st.sampled_from(["adapter", "adapter", "adapter+b", "all", "subset"]))
    if mode == "subset":
        picked = set(draw(st.lists(st.sampled_from(trainable), unique=True, max_size=len(trainable))))
    else:
        frozen = {"adapter": {"W", "b"}, "adapter+b": {"W"}, "all": set()}[mode]
        picked = set(trainable) - frozen
    grads = tuple(t for t in trainable if t in picked)  # in a fixed order
    return dict(op=op, lead=lead, k=k, n=n, dt=draw(st.sampled_from(list(DTYPES))),
                layout=draw(st.sampled_from(LAYOUTS_2D if len(lead) == 1 else LAYOUTS_3D)), bias=bias, grads=grads,
                data_seed=draw(st.integers(0, 2**16)))


@st.composite
def _lora_fields(draw) -> dict:
    return dict(r=draw(st.integers(1, 24)), scaling=draw(st.sampled_from(SCALINGS)), p=draw(st.sampled_from(RATES)),
                training=draw(st.sampled_from([True, True, False])),
                seed=draw(st.integers(0, 2**63 - 1)),
                lora_gemm=draw(st.sampled_from(["auto", "fused", "cublas", "decode"])))


@st.composite
def _sparse_fields(draw, n: int, k: int) -> dict:
    b = draw(st.sampled_from([1, 1, 2, 3, 8, 16, 32]))
    total = (-(-n // b)) * (-(-k // b))
    # The interpreter runs one program per few entries / per block: cap them to keep an example under 1 s.
    cap = MAX_ENTRIES if b == 1 else MAX_BLOCKS
    counts = [0, 1, 2] + [max(1, total // d) for d in (100, 10, 3, 1)]  # empty .. full
    nnz = min(draw(st.sampled_from(counts)), cap)
    plans = ["none", "tile32", "tile64"] if b == 1 else ["none", "built"]
    return dict(block=b, nnz=nnz, corner=draw(st.booleans()) and nnz > 0,
                idx_dtype=draw(st.sampled_from(["int64", "int32"])), plan=draw(st.sampled_from(plans)),
                sparse_gemm=draw(st.sampled_from(["auto", "dense"])),
                sddmm=draw(st.sampled_from(["auto", "tile", "gather"])))


@st.composite
def lora_cases(draw) -> Case:
    return Case(**draw(_common("lora", ("x", "A", "B", "W", "b"))), **draw(_lora_fields()))


@st.composite
def multi_cases(draw) -> Case:
    base = draw(_common("multi", ("x", "A", "B", "W", "b")))
    n_adapters = draw(st.integers(1, 5))
    ranks = tuple(draw(st.lists(st.integers(1, 24), min_size=n_adapters, max_size=n_adapters)))
    rates = tuple(draw(st.lists(st.sampled_from(RATES), min_size=n_adapters, max_size=n_adapters))
                  if draw(st.booleans()) else ())
    pattern = draw(st.sampled_from(["random", "no_base", "sorted", "same", "base", "cyclic"]))
    return Case(**base, ranks=ranks, ranks_given=draw(st.booleans()), rates=rates,
                training=draw(st.sampled_from([True, True, False])), seed=draw(st.integers(0, 2**63 - 1)),
                ids_pattern=pattern,
                per_seq=len(base["lead"]) == 2 and draw(st.booleans()),
                ids_dtype=draw(st.sampled_from(["int64", "int32"])))


@st.composite
def sparse_cases(draw) -> Case:
    base = draw(_common("sparse", ("x", "values", "W", "b")))
    return Case(**base, **draw(_sparse_fields(base["n"], base["k"])))


@st.composite
def rosa_cases(draw) -> Case:
    base = draw(_common("rosa", ("x", "A", "B", "values", "W", "b")))
    return Case(**base, **draw(_lora_fields()), **draw(_sparse_fields(base["n"], base["k"])))


# ---- building the inputs ------------------------------------------------------------------------------

def _x_source(case: Case, g: torch.Generator):
    """(src, view): a float64 tensor and the function that views it as x (*lead, k) in ``case.layout``.

    Gradients are taken with respect to src, so a strided view's gradient is compared in place."""
    lead, k = case.lead, case.k
    if case.layout == "contig":
        shape, view = lead + (k,), lambda s: s
    elif case.layout == "T":  # (k, M) transposed: unit stride along the rows
        shape, view = (k, lead[0]), lambda s: s.t()
    elif case.layout == "leadT":  # (T, S, k) with the leading dims swapped
        shape, view = (lead[1], lead[0], k), lambda s: s.transpose(0, 1)
    elif case.layout == "sliced":  # an inner window: storage offset, row stride k + 3
        shape, view = lead[:-1] + (lead[-1] + 2, k + 3), lambda s: s[..., 1:-1, 2:2 + k]
    elif case.layout == "stride2":  # every other column: last-dim stride 2
        shape, view = lead + (2 * k,), lambda s: s[..., ::2]
    elif case.layout == "broadcast":  # one row expanded over all rows: stride 0
        shape, view = (1,) * len(lead) + (k,), lambda s: s.expand(*lead, k)
    else:
        raise AssertionError(case.layout)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEV), view


def _adapter_ids(case: Case, n_adapters: int, g: torch.Generator) -> torch.Tensor:
    shape = case.lead[:1] if case.per_seq else case.lead
    numel = int(torch.Size(shape).numel())
    pattern = case.ids_pattern
    if pattern == "random":
        ids = torch.randint(-1, n_adapters, (numel,), generator=g)
    elif pattern == "no_base":
        ids = torch.randint(0, n_adapters, (numel,), generator=g)
    elif pattern == "sorted":
        ids = torch.randint(-1, n_adapters, (numel,), generator=g).sort().values
    elif pattern == "same":
        ids = torch.full((numel,), int(torch.randint(0, n_adapters, (1,), generator=g)))
    elif pattern == "base":
        ids = torch.full((numel,), -1)
    elif pattern == "cyclic":  # every adapter and the base in turn
        ids = torch.arange(numel) % (n_adapters + 1) - 1
    else:
        raise AssertionError(pattern)
    return ids.view(shape).to(DEV, getattr(torch, case.ids_dtype))


def _delta(case: Case, g: torch.Generator):
    """Sorted unique indices (flat, or block (row, col)) and float64 values of ``case``'s sparse delta."""
    b, n, k = case.block, case.n, case.k
    rb, cb = -(-n // b), -(-k // b)
    total = rb * cb
    flat = torch.randperm(total, generator=g)[:case.nnz]
    if case.corner:  # the last entry / the clipped bottom-right block
        flat = torch.cat([flat[:-1], torch.tensor([total - 1])]).unique()
    flat = flat.sort().values
    idx_dtype = getattr(torch, case.idx_dtype)
    if b == 1:
        return flat.to(DEV, idx_dtype), torch.randn(flat.numel(), generator=g, dtype=torch.float64).to(DEV)
    idx = torch.stack([flat // cb, flat % cb], 1)
    return idx.to(DEV, idx_dtype), torch.randn(flat.numel(), b, b, generator=g, dtype=torch.float64).to(DEV) / b ** 0.5


@contextlib.contextmanager
def _env(**values):
    """Set environment variables for the block (hypothesis reruns the test body: no function fixtures)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, v in old.items():
            if v is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = v


# ---- one op, three runs, one comparison -----------------------------------------------------------------

def _amax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _run(call, tensors: dict, grads: tuple, dtype: torch.dtype, dy: torch.Tensor, compute=None) -> dict:
    """``{"y": ..., "d<name>": ...}`` of ``call(**leaves)``: float tensors (and ``dy``) rounded to ``dtype``,
    then computed in ``compute`` (default ``dtype``); the inputs named in ``grads`` require grad."""
    compute = compute or dtype
    leaves = {}
    for name, t in tensors.items():
        if t is not None and t.is_floating_point():
            t = t.detach().to(dtype).to(compute).requires_grad_(name in grads)
        leaves[name] = t
    y = call(**leaves)
    out = {"y": y}
    wanted = [name for name in grads if leaves.get(name) is not None]
    if wanted:
        dy = dy.to(dtype).to(compute)
        for name, gr in zip(wanted, torch.autograd.grad(y, [leaves[w] for w in wanted], dy)):
            out["d" + name] = gr
    return out


def _check(case: Case, call, tensors: dict):
    """Triton vs the float64 reference (and, in fp16 / bf16, vs the reference in that dtype).

    The float64 oracle runs on the inputs already rounded to the case's dtype, as flash-attention's tests
    upcast their fp16 inputs: both errors then measure the computation only. (Against the unrounded
    inputs, the input rounding that both runs share can cancel PyTorch's own rounding by luck, e.g. in a
    one-row dA = s (dY B)^T x whose elements all carry the same rounding of dY B.)"""
    note(f"case id: {case.id}")
    dtype = DTYPES[case.dt]
    dy = torch.randn(*case.lead, case.n, generator=torch.Generator().manual_seed(case.data_seed + 1),
                     dtype=torch.float64).to(DEV)
    got = _run(lambda **t: call("triton", **t), tensors, case.grads, dtype, dy)
    exact = _run(lambda **t: call("reference", **t), tensors, case.grads, dtype, dy, compute=torch.float64)
    assert got.keys() == exact.keys(), (case.id, sorted(got), sorted(exact))
    if dtype == torch.float32:
        for name, e in exact.items():
            g = got[name]
            assert g.dtype == dtype and g.shape == e.shape, (case.id, name, g.dtype, g.shape, e.shape)
            assert_close_report(g, e, rtol=1e-5, atol=1e-5 * max(1.0, _amax(e)), what=f"{case.id} {name}")
        return
    low = _run(lambda **t: call("reference", **t), tensors, case.grads, dtype, dy)
    for name, e in exact.items():
        g, t = got[name], low[name]
        assert g.dtype == dtype and g.shape == e.shape, (case.id, name, g.dtype, g.shape, e.shape)
        err = (g.double() - e).abs()
        torch_err, tiny = _amax(t.double() - e), torch.finfo(dtype).eps * _amax(e)
        if _amax(err) > 2 * torch_err + tiny or not bool(g.isfinite().all()):
            i = int(err.nan_to_num(float("inf")).argmax())
            pos = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))
            raise AssertionError(f"{case.id} {name}: kernel error {_amax(err):.3g} > 2 x PyTorch's {torch_err:.3g} "
                                 f"+ {tiny:.3g}; worst at {pos}: got {g.flatten()[i].item():.6g}, expected "
                                 f"{e.flatten()[i].item():.6g} (PyTorch {case.dt}: {t.flatten()[i].item():.6g})")


def _base_tensors(case: Case, g: torch.Generator) -> tuple:
    """(src, view, W, b): x's source and view, weight (n, k), bias (n,) or None, all float64."""
    src, view = _x_source(case, g)
    w = torch.randn(case.n, case.k, generator=g, dtype=torch.float64).to(DEV) / case.k ** 0.5
    b = torch.randn(case.n, generator=g, dtype=torch.float64).to(DEV) if case.bias else None
    return src, view, w, b


def _lora_factors(case: Case, g: torch.Generator) -> tuple:
    a = torch.randn(case.r, case.k, generator=g, dtype=torch.float64).to(DEV) / case.k ** 0.5
    bb = torch.randn(case.n, case.r, generator=g, dtype=torch.float64).to(DEV) / case.r ** 0.5
    return a, bb


def _plan(case: Case, idx: torch.Tensor):
    if case.plan == "none":
        return None
    tile = {"tile32": 32, "tile64": 64}.get(case.plan)
    return build_sparse_plan(idx, case.n, case.k, case.block, tile=tile)


# ---- the tests: one per op ------------------------------------------------------------------------------

@given(case=lora_cases())
def test_lora_linear_agrees(case):
    """``lora_linear``: y, dx, dA, dB (and dW, db when they require grad)."""
    g = torch.Generator().manual_seed(case.data_seed)
    src, view, w, b = _base_tensors(case, g)
    a, bb = _lora_factors(case, g)

    def call(backend, x, W, b, A, B):
        return fastpeft.lora_linear(view(x), W, b, A, B, case.scaling, dropout_p=case.p, training=case.training,
                                    seed=case.seed, backend=backend)

    with _env(FASTPEFT_LORA_GEMM=case.lora_gemm):
        _check(case, call, dict(x=src, W=w, b=b, A=a, B=bb))


@given(case=multi_cases())
def test_lora_linear_multi_agrees(case):
    """``lora_linear_multi``: y, dx, dA stack, dB stack (and dW, db), with random values past each adapter's
    rank that must never count."""
    g = torch.Generator().manual_seed(case.data_seed)
    src, view, w, b = _base_tensors(case, g)
    n_adapters, r_max = len(case.ranks), max(case.ranks)
    a = torch.randn(n_adapters, r_max, case.k, generator=g, dtype=torch.float64).to(DEV) / case.k ** 0.5
    bb = torch.randn(n_adapters, case.n, r_max, generator=g, dtype=torch.float64).to(DEV) / r_max ** 0.5
    scalings = torch.tensor(SCALINGS * 2, dtype=torch.float32)[torch.randperm(2 * len(SCALINGS), generator=g)]
    scalings = scalings[:n_adapters].to(DEV)
    ranks = torch.tensor(case.ranks, device=DEV) if case.ranks_given else None
    rates = torch.tensor(case.rates, device=DEV) if case.rates else None
    ids = _adapter_ids(case, n_adapters, g)

    def call(backend, x, W, b, A, B):
        return fastpeft.lora_linear_multi(view(x), W, b, A, B, scalings, ids, ranks, backend=backend,
                                          dropout_p=rates, training=case.training, seed=case.seed)

    _check(case, call, dict(x=src, W=w, b=b, A=a, B=bb))


@given(case=sparse_cases())
def test_sparse_delta_linear_agrees(case):
    """``sparse_delta_linear``: y, dx, dvalues (and dW, db)."""
    g = torch.Generator().manual_seed(case.data_seed)
    src, view, w, b = _base_tensors(case, g)
    idx, vals = _delta(case, g)
    plan = _plan(case, idx)

    def call(backend, x, W, b, values):
        return sparse_delta_linear(view(x), W, b, idx, values, case.block, backend=backend,
                                   plan=plan if backend == "triton" else None)

    with _env(FASTPEFT_SPARSE_GEMM=case.sparse_gemm, FASTPEFT_SPARSE_SDDMM=case.sddmm):
        _check(case, call, dict(x=src, W=w, b=b, values=vals))


@given(case=rosa_cases())
def test_lora_sparse_linear_agrees(case):
    """``lora_sparse_linear`` (RoSA): y, dx, dA, dB, dvalues (and dW, db)."""
    g = torch.Generator().manual_seed(case.data_seed)
    src, view, w, b = _base_tensors(case, g)
    a, bb = _lora_factors(case, g)
    idx, vals = _delta(case, g)
    plan = _plan(case, idx)

    def call(backend, x, W, b, A, B, values):
        return lora_sparse_linear(view(x), W, b, A, B, case.scaling, idx, values, case.block, dropout_p=case.p,
                                  training=case.training, seed=case.seed, backend=backend,
                                  plan=plan if backend == "triton" else None)

    with _env(FASTPEFT_LORA_GEMM=case.lora_gemm, FASTPEFT_SPARSE_GEMM=case.sparse_gemm,
              FASTPEFT_SPARSE_SDDMM=case.sddmm):
        _check(case, call, dict(x=src, W=w, b=b, A=a, B=bb, values=vals))
