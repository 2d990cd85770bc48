"""The timed choice (``kernels.lora.timed_choice``) and its uses: LoRA's GEMM of the kernel path (fused /
TMA / cuBLAS, ``ops.lora.gemm_candidates``) and LoRA's whole forward / backward (kernels / torch composition,
``ops.lora.choose_path``); the sparse-delta ops' floor (kernels / torch composition, ``ops.sparse.choose_path``,
FASTPEFT_SPARSE_PATH). Timers are faked: the fastest candidate wins, once per key, candidates that cannot run
are never offered, forced and deterministic modes hold. Each forced path is also run against the reference.

The sparse tests (``-k sparse``) also run on a GPU (TRITON_INTERPRET=0), on CUDA tensors; the LoRA ones need
the interpreter."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import assert_close_report, triton_backend_device  # noqa: E402
from fastpeft import kernels  # noqa: E402

DEV = triton_backend_device()

from fastpeft.kernels import lora as K  # noqa: E402
from fastpeft.kernels import lora_tma as KT  # noqa: E402
from fastpeft.kernels import sparse_delta as SD  # noqa: E402
from fastpeft.ops import lora as OL  # noqa: E402
from fastpeft.ops import sparse as OS  # noqa: E402

CUDA = torch.device("cuda")
# The forced paths are compared with the reference backend: on CPU tensors it draws the kernels' Philox masks.
pytestmark = pytest.mark.usefixtures("kernel_stream_reference")


@pytest.fixture
def timed(monkeypatch):
    """auto mode timed as on CUDA, with a fake clock: ``clock[name]`` ms for the candidate ``name``."""
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "auto")
    monkeypatch.delenv("FASTPEFT_DETERMINISTIC", raising=False)
    monkeypatch.setattr(K, "INTERPRET", False)
    clock, ran = {}, []
    monkeypatch.setattr(K, "_bench", lambda fn: clock[fn()])

    def cands(*names):
        return {n: (lambda n=n: ran.append(n) or n) for n in names}
    return clock, ran, cands


@pytest.mark.parametrize("fastest", ["fused", "tma", "cublas"])
def test_fastest_gemm_wins_and_is_cached(timed, fastest):
    clock, ran, cands = timed
    clock.update({"fused": 3.0, "tma": 2.0, "cublas": 4.0}, **{fastest: 1.0})
    cache = {}
    run = cands("fused", "tma", "cublas")
    assert K.timed_choice(cache, ("k",), "auto", CUDA, run, "cublas") == fastest
    assert cache == {("k",): fastest}
    n = len(ran)
    assert K.timed_choice(cache, ("k",), "auto", CUDA, run, "cublas") == fastest and len(ran) == n  # not re-timed


def test_torch_composition_wins_where_faster(timed, monkeypatch):
    clock, ran, cands = timed
    clock.update(kernels=2.0, torch=1.0)
    monkeypatch.setattr(OL, "_path_cache", {})
    assert OL.choose_path(("fwd", 1), cands("kernels", "torch"), CUDA) == "torch"
    clock.update(kernels=0.5)
    assert OL.choose_path(("fwd", 2), cands("kernels", "torch"), CUDA) == "kernels"


def test_backward_one_dy_pass_is_timed_with_the_others(timed, monkeypatch):
    """The backward's third composition ("kernels-dy1", v and dB from one read of dY) is one more timed
    candidate: kept where fastest; a forced GEMM still forces "kernels", "torch" forces torch, and
    deterministic mode and tracing keep "kernels" without timing."""
    clock, ran, cands = timed
    clock.update({"kernels": 2.0, "kernels-dy1": 1.5, "torch": 1.8})
    monkeypatch.setattr(OL, "_path_cache", {})
    three = ("kernels", "kernels-dy1", "torch")
    assert OL.choose_path(("bwd", 1), cands(*three), CUDA) == "kernels-dy1"
    clock.update({"kernels-dy1": 2.5})
    assert OL.choose_path(("bwd", 2), cands(*three), CUDA) == "torch"
    assert OL.choose_path(("bwd", 1), cands(*three), CUDA) == "kernels-dy1"  # cached
    n = len(ran)
    for gemm, want in (("fused", "kernels"), ("cublas", "kernels"), ("torch", "torch")):
        monkeypatch.setenv("FASTPEFT_LORA_GEMM", gemm)
        assert OL.choose_path(("bwd", 3), cands(*three), CUDA) == want
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "auto")
    with fastpeft.deterministic():
        assert OL.choose_path(("bwd", 1), cands(*three), CUDA) == "kernels"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert OL.choose_path(("bwd", 4), cands(*three), CUDA) == "kernels"
    assert len(ran) == n  # none of these was timed

def test_a_measured_winner_not_offered_gives_the_fixed_choice(timed):
    """A key measured with a candidate that a later call of the same key does not offer (a row-count threshold
    inside the key's power of two, strides the TMA path refuses): the fixed choice, not a KeyError, and the
    measurement kept (not re-timed)."""
    clock, ran, cands = timed
    clock.update({"kernels": 2.0, "tma-shrink": 1.0, "torch": 3.0})
    cache = {}
    three = cands("kernels", "tma-shrink", "torch")
    assert K.timed_choice(cache, ("k",), "auto", CUDA, three, "kernels") == "tma-shrink"
    n = len(ran)
    assert K.timed_choice(cache, ("k",), "auto", CUDA, cands("kernels", "torch"), "kernels") == "kernels"
    assert K.timed_choice(cache, ("k",), "auto", CUDA, cands("torch", "kernels"), "cublas") == "torch"  # fixed absent
    assert len(ran) == n and cache == {("k",): "tma-shrink"}


def test_a_candidate_the_card_cannot_run_is_left_out(timed):
    """A candidate whose first run raises triton's OutOfResources (a config over the card's shared memory, as an
    fp32 rank-256 launch was) or a compile error is not timed: the fastest of the others wins, with a warning
    naming it and the error. Any other exception is a bug and propagates; where every candidate cannot run,
    the first error does."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    clock, ran, cands = timed
    clock.update({"fused": 0.5, "tma": 2.0, "cublas": 3.0})

    def raising(exc):
        def run():
            ran.append("raised")
            raise exc
        return run
    oor = OutOfResources(245760, 232448, "shared memory")
    run = dict(cands("fused", "tma", "cublas"), fused=raising(oor))
    cache = {}
    with pytest.warns(RuntimeWarning, match=r"'fused' cannot run here \(OutOfResources: out of resource: "
                                            r"shared memory.*runs the fastest of \('tma', 'cublas'\)"):
        assert K.timed_choice(cache, ("oor",), "auto", CUDA, run, "cublas") == "tma"
    assert cache == {("oor",): "tma"} and ran.count("raised") == 1  # its one failed run, never timed
    import ast
    comp = CompilationError("x = 1", ast.parse("x = 1").body[0], "unsupported")
    run = dict(cands("fused", "tma", "cublas"), tma=raising(comp))
    with pytest.warns(RuntimeWarning, match="'tma' cannot run here .CompilationError"):
        assert K.timed_choice({}, ("ce",), "auto", CUDA, run, "cublas") == "fused"
    with pytest.raises(ZeroDivisionError):  # a bug, not a resource limit
        K.timed_choice({}, ("bug",), "auto", CUDA, dict(cands("tma"), fused=raising(ZeroDivisionError())), "tma")
    with pytest.raises(OutOfResources):
        K.timed_choice({}, ("all",), "auto", CUDA, {"a": raising(oor), "b": raising(oor)}, "a")
    from triton.runtime.errors import AutotunerError  # an autotune list whose prune keeps nothing
    run = dict(cands("tma", "cublas"), tma=raising(AutotunerError("No valid autotuner configs after pruning")))
    with pytest.warns(RuntimeWarning, match="'tma' cannot run here .AutotunerError"):
        assert K.timed_choice({}, ("empty",), "auto", CUDA, run, "cublas") == "cublas"


def test_forced_and_deterministic_modes_hold(timed, monkeypatch):
    clock, ran, cands = timed
    run = cands("fused", "tma", "cublas")
    for name in ("fused", "tma", "cublas"):
        monkeypatch.setenv("FASTPEFT_LORA_GEMM", name)
        assert K.choose_gemm(("f", name), run, CUDA) == name
        assert OL.choose_path(("f", name), cands("kernels", "torch"), CUDA) == "kernels"
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "torch")
    assert OL.choose_path(("f", "t"), cands("kernels", "torch"), CUDA) == "torch"
    assert K.choose_gemm(("f", "t"), run, CUDA) == "cublas"  # what the sparse family's GEMM takes then
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "tma")
    with pytest.raises(ValueError, match="'tma' is forced but cannot run here"):
        K.choose_gemm(("f", "x"), cands("fused", "cublas"), CUDA)
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "auto")
    with fastpeft.deterministic():
        assert K.choose_gemm(("d",), run, CUDA) == "cublas"
        assert OL.choose_path(("d",), cands("kernels", "torch"), CUDA) == "kernels"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert K.choose_gemm(("c",), run, CUDA) == "cublas"
    assert not ran  # nothing was timed


def test_unavailable_candidates_are_never_offered(monkeypatch):
    a, b = torch.randn(8, 64), torch.randn(64, 48)
    lu, lv = torch.randn(8, 4), torch.randn(4, 48)
    monkeypatch.setattr(KT, "tma_supported", lambda device: False)
    assert tuple(OL.gemm_candidates(a, b, lu, lv, scale=1.0)) == ("fused", "cublas")
    monkeypatch.setattr(KT, "tma_supported", lambda device: True)
    assert tuple(OL.gemm_candidates(a, b, lu, lv, scale=1.0)) == ("fused", "tma", "cublas")
    odd = torch.randn(64, 50)  # N = 50: rows of 200 bytes, not whole 16-byte TMA rows
    assert tuple(OL.gemm_candidates(a, odd, lu, torch.randn(4, 50), scale=1.0)) == ("fused", "cublas")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuple(OL.gemm_candidates(a, b, lu, lv, scale=1.0)) == ("fused", "cublas")


def test_fused_shrink_is_offered_where_it_can_run(monkeypatch):
    """The forward offers ``"tma-shrink"`` (after the kernels, so ties and fixed modes keep them) from
    FUSED_SHRINK_MIN_ROWS rows, where TMA runs, at ranks up to 64, with TMA rows and one dtype, not while
    tracing; below that row count only when forced."""
    def offered(m=OL.FUSED_SHRINK_MIN_ROWS, k=48, r=8, dtype=torch.float32):
        x, w, a = torch.randn(m, k).to(dtype), torch.randn(40, k).to(dtype), torch.randn(r, k).to(dtype)
        return tuple(OL.offered_forwards(x, w, a))
    three = ("kernels", "tma-shrink", "torch")
    assert offered() == three
    assert offered(m=OL.FUSED_SHRINK_MIN_ROWS - 1) == ("kernels", "torch")
    assert offered(r=65) == ("kernels", "torch")     # R_PAD 128: no config holds it
    assert offered(k=50) == ("kernels", "torch")     # rows of 200 bytes: not TMA rows
    assert offered(dtype=torch.bfloat16) == three
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "tma-shrink")
    assert offered(m=5) == three + ("decode",)       # forced: offered at any row count (and decode's 5 rows)
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "auto")
    x, w, a = torch.randn(OL.FUSED_SHRINK_MIN_ROWS, 48), torch.randn(40, 48), torch.randn(8, 48)
    assert OL._fused_shrink_offered(x, w, a)
    with monkeypatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)  # a plain launcher: dynamo does not trace it
        assert not OL._fused_shrink_offered(x, w, a)
    # the backward's fused dY pass: the same rules, on dY (M, N) @ W (N, K)
    dy, bb = torch.randn(OL.FUSED_SHRINK_MIN_ROWS, 40), torch.randn(40, 8)
    assert OL._fused_dy_offered(dy, w, bb, False) and OL._fused_dy_offered(dy, w, bb, True)
    assert not OL._fused_dy_offered(dy[:-1], w, bb, False)
    assert not OL._fused_dy_offered(dy, w, torch.randn(40, 65), False)
    assert OL._fused_dy_offered(dy, w, torch.randn(40, 64), False)
    assert not OL._fused_dy_offered(dy, w, torch.randn(40, 64), True)  # the mask: ranks up to 32
    assert not OL._fused_dy_offered(torch.randn(OL.FUSED_SHRINK_MIN_ROWS, 42), torch.randn(42, 48), bb[:42], False)
    assert not OL._fused_dy_offered(dy, w, bb.to(torch.bfloat16), False)
    # CUDA MPS with an SM limit: fewer SMs than reported, and a waiting program could spin for ever
    for pct, ok in (("50", False), ("100", True), ("x", False)):
        with monkeypatch.context() as mp:
            mp.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", pct)
            assert (offered() == three) == ok and OL._fused_dy_offered(dy, w, bb, False) == ok
    monkeypatch.setattr(KT, "tma_supported", lambda device: False)
    assert offered() == ("kernels", "torch")
    assert not OL._fused_dy_offered(dy, w, bb, False)


@pytest.mark.parametrize("rank", [1, 16, 17, 32, 33, 64, 65, 128])
def test_fp32_fused_paths_are_offered_only_where_a_config_fits_shared_memory(rank):
    """fp32 tiles take twice bf16's shared memory: the fused TMA paths hold ranks up to 32 (the forward's shrink)
    and 64 (the dY pass, 32 with the mask) in bf16's registers, but in fp32 only where a config's pipelined tiles
    fit (``_config_fits`` with the real element size); the prune then keeps one. Explicit test blocks count as
    2 bytes (their one-stage tiles fit in any dtype)."""
    from fastpeft.kernels._common import r_pad
    rp = r_pad(rank)
    f32 = {"a_ptr": torch.empty(0), "x_ptr": torch.empty(0)}
    assert KT.shrink_fits(rank, 4) == (rp <= 32)
    assert KT.shrink_fits(rank, 4) <= KT.shrink_fits(rank, 2)
    for x_mask in (False, True):
        kept = KT._prune_tma_configs(KT._TMA_CONFIGS, f32, R_PAD=rp, SHRINK=True, X_MASK=x_mask, B_NK=True)
        assert bool(kept) >= KT.shrink_fits(rank, 4), (rank, x_mask)
        assert all(c.num_stages * (128 + c.kwargs["BLOCK_N"] + rp) * c.kwargs["BLOCK_K"] * 4 <= KT._SMEM_LIMIT
                   for c in kept)
    for masked in (False, True):
        kept = KT._prune_tma_configs(KT._TMA_CONFIGS, f32, R_PAD=rp, SHRINK=True, DB_PART=True, HAS_MASK=masked)
        assert bool(kept) == KT.dy_pass_fits(rank, masked, 4), (rank, masked)
    assert bool(KT._prune_multi_configs(KT._TMA_CONFIGS, f32, R_PAD=rp)) >= KT.shrink_fits(rank, 4)
    # the plain TMA GEMM keeps a config in fp32 at every R_PAD the epilogue takes
    assert KT._prune_tma_configs(KT._TMA_CONFIGS, f32, R_PAD=rp, HAS_MASK=False) or rp > 64
    x = torch.empty(4, 8)
    assert KT.fits_itemsize(x) == 2  # under the interpreter: the explicit test config


@pytest.mark.parametrize("rank", [1, 16, 17, 32, 33, 64, 65, 128])
def test_every_offered_fused_path_keeps_a_config(rank):
    """Where the fused forward / backward is offered, the autotune prune leaves at least one config (an empty
    list would fail the launch); where it is not, none or only spilling ones would be left."""
    from fastpeft.kernels._common import r_pad
    rp = r_pad(rank)
    for x_mask in (False, True):
        kept = KT._prune_tma_configs(KT._TMA_CONFIGS, {}, R_PAD=rp, SHRINK=True, X_MASK=x_mask, B_NK=True)
        assert bool(kept) >= KT.shrink_fits(rank), (rank, x_mask)
    for masked in (False, True):
        kept = KT._prune_tma_configs(KT._TMA_CONFIGS, {}, R_PAD=rp, SHRINK=True, DB_PART=True, HAS_MASK=masked)
        assert bool(kept) == KT.dy_pass_fits(rank, masked), (rank, masked)
        for named, isz in (({}, 2), ({"a_ptr": torch.empty(0)}, 4)):  # bf16 and fp32 operands
            for dm in (False, True):
                kept = KT._prune_tma_configs(KT._TMA_CONFIGS, named, R_PAD=rp, SHRINK=True, DB_PART=True,
                                             HAS_MASK=masked, K_SCALE=True, DM_PART=dm)
                assert bool(kept) == KT.dora_dy_pass_fits(rank, masked, isz, dm_part=dm), (rank, masked, isz, dm)
    kept = KT._prune_multi_configs(KT._TMA_CONFIGS, {}, R_PAD=rp)  # many adapters: r_max's R_PAD
    assert bool(kept) >= KT.shrink_fits(rank), rank
    assert all(c.num_warps == 8 for c in kept)  # at 4 warps triton 3.6 does not compile it
    from fastpeft.kernels import sparse_delta as SD
    for masked in (False, True):  # the TMA sparse GEMM with RoSA's epilogue at this rank (any rank: R_PAD <= 128)
        kept = SD._prune_sparse_tma_configs(KT._TMA_CONFIGS, {}, R_PAD=rp, HAS_MASK=masked)
        assert bool(kept) == (rp <= 64) == SD.tma_rank_fits(rank), (rank, masked)


def test_backward_offers_the_fused_dy_pass_where_dx_is_needed(monkeypatch):
    """``"tma-dy"`` joins the backward's candidates when dX is needed; forced, it runs where offered and the
    kernels run where it is not (no dX)."""
    seen = []
    real = OL.choose_path
    monkeypatch.setattr(OL, "choose_path", lambda key, run, device: seen.append((key[0], tuple(run)))
                        or real(key, run, device))
    m = OL.FUSED_SHRINK_MIN_ROWS
    w, a, bb = torch.randn(40, 48), torch.randn(8, 48, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    for x_grad in (True, False):
        seen.clear()
        x = torch.randn(m, 48, requires_grad=x_grad)
        fastpeft.lora_linear(x, w, None, a, bb, 1.0, backend="triton").sum().backward()
        bwd = [names for kind, names in seen if kind == "bwd"][0]
        assert ("tma-dy" in bwd) == x_grad, bwd
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "tma-shrink")
    assert OL.choose_path(("bwd",), {"kernels": 1, "tma-dy": 2}, CUDA) == "tma-dy"
    assert OL.choose_path(("bwd",), {"kernels": 1, "torch": 2}, CUDA) == "kernels"


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("gemm", ["fused", "tma", "cublas", "torch", "tma-shrink"])
def test_every_forced_path_matches_the_reference(monkeypatch, gemm, p):
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", gemm)
    g = torch.Generator().manual_seed(0)
    m, k, n, r = 33, 64, 48, 8
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w, bias = torch.randn(n, k, generator=g) / 8, torch.randn(n, generator=g)
    a = (torch.randn(r, k, generator=g) / 8).requires_grad_()
    bb = (torch.randn(n, r, generator=g) / 8).requires_grad_()
    dy = torch.randn(m, n, generator=g)
    outs = []
    for backend in ("triton", "reference"):
        y = fastpeft.lora_linear(x, w, bias, a, bb, 2.0, dropout_p=p, seed=5, backend=backend)
        outs.append([y] + list(torch.autograd.grad(y, (x, a, bb), dy)))
    for name, got, want in zip(("y", "dx", "dA", "dB"), *outs):
        assert_close_report(got, want, rtol=1e-4, atol=1e-4, what=f"{gemm} p={p} {name}")


@pytest.mark.parametrize("fwd,bwd", [("torch", "kernels"), ("kernels", "torch"), ("torch", "kernels-dy1"),
                                     ("kernels", "kernels-dy1")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_may_choose_differently(monkeypatch, fwd, bwd, dtype):
    """The two choices are made apart (u is fp32 from the kernels, x's dtype from torch): each mix works."""
    monkeypatch.setattr(OL, "choose_path", lambda key, run, device: fwd if key[0] == "fwd" else bwd)
    g = torch.Generator().manual_seed(1)
    m, k, n, r = 7, 48, 40, 4
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) / 8).to(dtype)
    a = (torch.randn(r, k, generator=g) / 8).to(dtype).requires_grad_()
    bb = (torch.randn(n, r, generator=g) / 8).to(dtype).requires_grad_()
    dy = torch.randn(m, n, generator=g).to(dtype)
    def run(backend, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, a, bb)]
        y = fastpeft.lora_linear(leaves[0], w.to(cast), None, leaves[1], leaves[2], 2.0, dropout_p=0.1, seed=3,
                                 backend=backend)
        return [t.float() for t in [y] + list(torch.autograd.grad(y, leaves, dy.to(cast)))]
    got, same, exact = run("triton", dtype), run("reference", dtype), run("reference", torch.float32)
    # The flash-attention rule: the mixed path's error to fp32 at most 2x that of PyTorch in the same dtype.
    for name, g_, s_, e_ in zip(("y", "dx", "dA", "dB"), got, same, exact):
        err, base = (g_ - e_).abs().max().item(), (s_ - e_).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{fwd}/{bwd} {name}: error {err:.3g} vs PyTorch's {base:.3g}"


# ---- the sparse-delta ops' floor: the kernels or the plain torch composition (ops.sparse.choose_path) --------

SPARSE_ENV = ("FASTPEFT_SPARSE_PATH", "FASTPEFT_SPARSE_GEMM", "FASTPEFT_SPARSE_SDDMM")
# (block size, M, in, out): flat entries; 16 x 16 blocks tiling W exactly; 32 x 32 blocks clipped at the
# bottom and right edges.
SPARSE_CASES = [(1, 33, 130, 80), (16, 7, 64, 48), (32, 33, 130, 80)]


@pytest.fixture
def sparse_env(monkeypatch):
    """Every sparse switch at its default (auto), and no deterministic mode from the environment."""
    for var in SPARSE_ENV:
        monkeypatch.setenv(var, "auto")
    monkeypatch.delenv("FASTPEFT_DETERMINISTIC", raising=False)
    monkeypatch.setattr(OS, "_path_cache", {})
    return monkeypatch


def _sparse_inputs(b, m, k, n, r=8, seed=0, density=0.3):
    """fp64 x, W, bias, A, B, sorted indices (one block on the clipped corner) and values, on DEV."""
    g = torch.Generator().manual_seed(seed)
    rb, cb = -(-n // b), -(-k // b)
    flat = torch.randperm(rb * cb, generator=g)[:max(1, round(density * rb * cb))]
    flat = torch.unique(torch.cat([flat, torch.tensor([rb * cb - 1])]))  # sorted
    idx = flat if b == 1 else torch.stack([flat // cb, flat % cb], 1).to(torch.int32)
    vals = torch.randn(*((flat.numel(),) if b == 1 else (flat.numel(), b, b)), generator=g, dtype=torch.float64)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    a = torch.randn(r, k, generator=g, dtype=torch.float64) / k ** 0.5
    bb = torch.randn(n, r, generator=g, dtype=torch.float64) / r ** 0.5
    return [t.to(DEV) for t in (x, w, bias, a, bb, idx, vals)]


def _sparse_run(backend, dtype, inputs, b, rosa, p=0.0, seed=5):
    """Output and gradients (x, values[, A, B]) of one call of sparse_delta_linear / lora_sparse_linear in dtype."""
    x, w, bias, a, bb, idx, vals = inputs
    x, vals, a, bb = (t.detach().to(dtype).requires_grad_() for t in (x, vals, a, bb))
    w, bias = w.to(dtype), bias.to(dtype)
    dy = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    if rosa:
        y = fastpeft.lora_sparse_linear(x, w, bias, a, bb, 0.5, idx, vals, b, dropout_p=p, seed=seed, backend=backend)
        wrt = (x, vals, a, bb)
    else:
        y = fastpeft.sparse_delta_linear(x, w, bias, idx, vals, b, backend=backend)
        wrt = (x, vals)
    return [y] + list(torch.autograd.grad(y, wrt, dy.to(DEV, dtype)))


def _spy(monkeypatch, module, names, calls):
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))


KERNEL_PIECES = ("densify_op", "block_gemm_op", "sddmm_blocks_op", "sddmm_tiles_op", "gather_dot_op")
TORCH_PIECES = ("w_plus_delta_torch", "sddmm_torch")


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("op,p", [("sparse", 0.0), ("rosa", 0.0), ("rosa", 0.1)],
                         ids=["sparse", "rosa-p0", "rosa-p0.1"])
@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("b,m,k,n", SPARSE_CASES, ids=[f"b{c[0]}-M{c[1]}-K{c[2]}-N{c[3]}" for c in SPARSE_CASES])
def test_sparse_forced_path_matches_the_reference(sparse_env, b, m, k, n, path, op, p, dt):
    """FASTPEFT_SPARSE_PATH=kernels|torch runs that composition only, forward and backward, with the
    reference's output and gradients: fp32 close to fp64, bf16 within 2x PyTorch's own bf16 error."""
    sparse_env.setenv("FASTPEFT_SPARSE_PATH", path)
    calls = []
    _spy(sparse_env, SD, KERNEL_PIECES, calls)
    _spy(sparse_env, OS, TORCH_PIECES, calls)
    inputs = _sparse_inputs(b, m, k, n)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    got = _sparse_run("triton", dtype, inputs, b, op == "rosa", p)
    ran = set(calls)
    assert ran and ran <= set(TORCH_PIECES if path == "torch" else KERNEL_PIECES), ran
    exact = _sparse_run("reference", torch.float64, inputs, b, op == "rosa", p)
    names = ("y", "dx", "dvalues", "dA", "dB")
    if dtype == torch.float32:
        for name, g_, e_ in zip(names, got, exact):
            assert g_.dtype == torch.float32 and g_.shape == e_.shape, name
            assert_close_report(g_, e_, rtol=1e-5, atol=1e-5 * max(1.0, e_.abs().max().item()),
                                what=f"{path} {op} b{b} {name}")
        return
    same = _sparse_run("reference", dtype, inputs, b, op == "rosa", p)
    for name, g_, s_, e_ in zip(names, got, same, exact):
        assert g_.dtype == dtype and g_.shape == e_.shape, name
        err, base = (g_.double() - e_).abs().max().item(), (s_.double() - e_).abs().max().item()
        assert err <= 2 * base + 1e-3 * e_.abs().max().item(), f"{path} {op} b{b} {name}: {err:.3g} vs {base:.3g}"


@pytest.mark.parametrize("b", [1, 16], ids=["b1", "b16"])
def test_sparse_compositions_agree_bit_for_bit_in_forward(sparse_env, b):
    """The torch W + Δ is the kernels' densify (fp32 sum, rounded once): same bits, clipped blocks included."""
    x, w, bias, a, bb, idx, vals = _sparse_inputs(b, 33, 130, 80)
    for dt in (torch.float32, torch.bfloat16):
        w2 = OS.w_plus_delta_torch(w.to(dt), idx, vals.to(dt), b, dt)
        assert w2.is_contiguous() and w2.shape == (80, 130)
        torch.testing.assert_close(w2, SD.sparse_densify(w.to(dt), idx, vals.to(dt), b, dt), rtol=0, atol=0)


@pytest.mark.skipif(DEV != "cpu", reason="the same torch code runs on CUDA; the dispatch mode is checked on the CPU")
def test_sparse_torch_composition_forms_nothing_weight_sized_but_w_prime(sparse_env, monkeypatch):
    """The torch backward of the values alone (x frozen) forms no (out, in) tensor: the flat entries' dY^T X
    goes by row panels, the blocks' by gathered panels; with dX, only W + Δ (transient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() >= n * k:
                    self.big.append((str(func), tuple(t.shape)))
            return out

    monkeypatch.setenv("FASTPEFT_SPARSE_PATH", "torch")
    m, k, n = 16, 130, 80
    for b in (1, 32):
        x, w, bias, a, bb, idx, vals = (t.float() if t.is_floating_point() else t for t in _sparse_inputs(b, m, k, n))
        for need_x in (False, True):
            xx, vv = x.clone().requires_grad_(need_x), vals.clone().requires_grad_()
            y = fastpeft.sparse_delta_linear(xx, w, bias, idx, vv, b, backend="triton")
            with Sizes() as sizes:
                torch.autograd.grad(y, [xx, vv] if need_x else [vv], torch.ones_like(y))
            if need_x:  # W + Δ (with a spare element after W for clipped blocks), and views of W
                assert sizes.big and {s for _, s in sizes.big} <= {(n * k,), (n * k + 1,), (n, k)}, sizes.big
            else:
                assert not sizes.big, (b, sizes.big)


def test_sparse_path_modes(sparse_env):
    """auto times the two (fastest wins, cached per key, not timed again); FASTPEFT_SPARSE_PATH forces one;
    a forced kernel variant (FASTPEFT_SPARSE_GEMM / _SDDMM) keeps auto on the kernels; deterministic mode,
    tracing (even for a key timed in eager), the CPU and the interpreter keep the kernels."""
    mp = sparse_env
    mp.setattr(K, "INTERPRET", False)
    clock, ran = {"kernels": 2.0, "torch": 1.0}, []
    mp.setattr(K, "_bench", lambda fn: clock[fn()])

    def cands():
        return {n: (lambda n=n: ran.append(n) or n) for n in ("kernels", "torch")}

    assert OS.choose_path(("a",), cands(), CUDA) == "torch"
    assert OS._path_cache == {("a",): "torch"}
    n = len(ran)
    clock["kernels"] = 0.5
    assert OS.choose_path(("a",), cands(), CUDA) == "torch" and len(ran) == n  # cached, not re-timed
    assert OS.choose_path(("b",), cands(), CUDA) == "kernels"                  # another key: timed
    ran.clear()
    forced = [("FASTPEFT_SPARSE_PATH", "torch", "torch"), ("FASTPEFT_SPARSE_PATH", "kernels", "kernels"),
              ("FASTPEFT_SPARSE_GEMM", "fused", "kernels"), ("FASTPEFT_SPARSE_GEMM", "dense", "kernels"),
              ("FASTPEFT_SPARSE_SDDMM", "gather", "kernels"), ("FASTPEFT_SPARSE_SDDMM", "tile", "kernels")]
    for var, value, want in forced:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(var, value)
            assert OS.path_mode() == want
            assert OS.choose_path(("a",), cands(), CUDA) == want, (var, value)
    with pytest.MonkeyPatch.context() as env:  # the path forced wins over a forced kernel variant
        env.setenv("FASTPEFT_SPARSE_PATH", "torch")
        env.setenv("FASTPEFT_SPARSE_GEMM", "fused")
        assert OS.choose_path(("a",), cands(), CUDA) == "torch"
    with fastpeft.deterministic():
        assert OS.choose_path(("a",), cands(), CUDA) == "kernels"   # cached "torch", pinned anyway
        assert OS.choose_path(("c",), cands(), CUDA) == "kernels"
    assert OS.choose_path(("a",), cands(), torch.device("cpu")) == "kernels"
    mp.setattr(torch.compiler, "is_compiling", lambda: True)
    assert OS.choose_path(("a",), cands(), CUDA) == "kernels"
    assert OS.choose_path(("d",), cands(), CUDA) == "kernels"
    assert not ran and ("c",) not in OS._path_cache and ("d",) not in OS._path_cache  # nothing timed


def test_sparse_path_modes_with_the_one_dy_pass(sparse_env):
    """RoSA's backward offers three candidates: auto keeps the fastest, kernels-dy1 included;
    FASTPEFT_SPARSE_PATH=kernels still forces the two-shrink kernels composition and torch the torch one; a
    forced kernel variant, deterministic mode and tracing keep "kernels", untimed."""
    mp = sparse_env
    mp.setattr(K, "INTERPRET", False)
    clock, ran = {"kernels": 2.0, "kernels-dy1": 1.0, "torch": 1.5}, []
    mp.setattr(K, "_bench", lambda fn: clock[fn()])

    def cands():
        return {n: (lambda n=n: ran.append(n) or n) for n in ("kernels", "kernels-dy1", "torch")}

    assert OS.choose_path(("a",), cands(), CUDA) == "kernels-dy1"
    clock["kernels-dy1"] = 3.0
    assert OS.choose_path(("b",), cands(), CUDA) == "torch"
    assert OS.choose_path(("a",), cands(), CUDA) == "kernels-dy1"  # cached
    ran.clear()
    forced = [("FASTPEFT_SPARSE_PATH", "kernels", "kernels"), ("FASTPEFT_SPARSE_PATH", "torch", "torch"),
              ("FASTPEFT_SPARSE_GEMM", "fused", "kernels"), ("FASTPEFT_SPARSE_SDDMM", "gather", "kernels")]
    for var, value, want in forced:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(var, value)
            assert OS.choose_path(("a",), cands(), CUDA) == want, (var, value)
    with fastpeft.deterministic():
        assert OS.choose_path(("a",), cands(), CUDA) == "kernels"  # cached "kernels-dy1", pinned anyway
    mp.setattr(torch.compiler, "is_compiling", lambda: True)
    assert OS.choose_path(("a",), cands(), CUDA) == "kernels"
    assert OS.choose_path(("c",), cands(), CUDA) == "kernels"
    assert not ran and ("c",) not in OS._path_cache  # nothing timed


@pytest.mark.skipif(DEV != "cpu", reason="fakes CUDA timing on CPU tensors")
@pytest.mark.parametrize("b", [1, 16], ids=["b1", "b16"])
def test_sparse_rosa_backward_keeps_the_one_dy_pass_where_faster(sparse_env, b):
    """Through the op, CUDA's timing faked on CPU tensors (kernels-dy1 fastest in backward, torch in forward):
    RoSA's backward times kernels, kernels-dy1 and torch once and keeps kernels-dy1; the next call runs it
    untimed (one dY pass) with the same bits and the reference's results; chosen_paths reports it. Without
    dB (A and B frozen) it is not offered; deterministic mode and FASTPEFT_SPARSE_PATH=kernels do not run it."""
    mp = sparse_env
    mp.setattr(K, "INTERPRET", False)
    timed = []
    mp.setattr(K, "_bench", lambda fn: timed.append(fn.__name__) or {"kernels_dy1": 1.0, "composed": 1.5}.get(
        fn.__name__, 2.0))
    real_choose = OS.choose_path
    mp.setattr(OS, "choose_path", lambda key, run, device: real_choose(key, run, CUDA))  # nested GEMMs: the CPU
    passes = []
    _spy(mp, K, ("dy_pass_op",), passes)
    inputs = _sparse_inputs(b, 33, 130, 80)
    got = _sparse_run("triton", torch.float32, inputs, b, True, 0.1)
    assert timed == ["kernels", "composed", "kernels", "kernels_dy1", "composed"], timed
    assert OS.chosen_paths(33, 130, 80, b, inputs[5].shape[0], 8) == {"fwd": {"torch"}, "bwd": {"kernels-dy1"}}
    timed.clear()
    passes.clear()
    again = _sparse_run("triton", torch.float32, inputs, b, True, 0.1)
    assert not timed and passes == ["dy_pass_op"], (timed, passes)
    exact = _sparse_run("reference", torch.float64, inputs, b, True, 0.1)
    for name, g_, a_, e_ in zip(("y", "dx", "dvalues", "dA", "dB"), got, again, exact):
        assert torch.equal(g_, a_), name
        assert_close_report(g_, e_, rtol=1e-5, atol=1e-5 * max(1.0, e_.abs().max().item()), what=f"dy1 b{b} {name}")
    x, w, bias, a, bb, idx, vals = (t.float() if t.is_floating_point() else t for t in inputs)
    xx, vv = x.clone().requires_grad_(), vals.clone().requires_grad_()
    y = fastpeft.lora_sparse_linear(xx, w, bias, a, bb, 0.5, idx, vv, b, dropout_p=0.1, seed=5, backend="triton")
    passes.clear()
    torch.autograd.grad(y, (xx, vv), torch.ones_like(y))
    assert timed == ["kernels", "composed"] and not passes, (timed, passes)  # no dB: two candidates
    with fastpeft.deterministic():  # the key is cached as kernels-dy1: pinned to kernels anyway
        _sparse_run("triton", torch.float32, inputs, b, True, 0.1)
    mp.setenv("FASTPEFT_SPARSE_PATH", "kernels")
    _sparse_run("triton", torch.float32, inputs, b, True, 0.1)
    assert not passes and not timed[2:], (passes, timed)


@pytest.mark.parametrize("b", [1, 16], ids=["b1", "b16"])
def test_sparse_forced_torch_path_compiles_fullgraph(sparse_env, b):
    """FASTPEFT_SPARSE_PATH=torch under torch.compile(fullgraph=True): the torch composition traces without
    graph breaks (RoSA with dropout: its masked pieces stay on the kernels' registered ops)."""
    sparse_env.setenv("FASTPEFT_SPARSE_PATH", "torch")
    x, w, bias, a, bb, idx, vals = (t.float() if t.is_floating_point() else t
                                    for t in _sparse_inputs(b, 5, 64, 48, density=0.2))
    leaves = [t.requires_grad_() for t in (x, a, bb, vals)]

    def f(x, a, bb, vals):
        return fastpeft.lora_sparse_linear(x, w, bias, a, bb, 2.0, idx, vals, b, dropout_p=0.1, seed=3,
                                           backend="triton", check=False)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # the trace is the point; no codegen wait
    got, want = compiled(*leaves), f(*leaves)
    for name, g_, e_ in zip(("y", "dx", "dA", "dB", "dvalues"), [got] + list(torch.autograd.grad(got.sum(), leaves)),
                            [want] + list(torch.autograd.grad(want.sum(), leaves))):
        assert_close_report(g_, e_, rtol=1e-5, atol=1e-5, what=f"compiled b{b} {name}")


@pytest.mark.parametrize("value", ["fastest", "cublas", "1", "kernels-dy1"])
def test_sparse_path_bad_value_raises(sparse_env, value):
    sparse_env.setenv("FASTPEFT_SPARSE_PATH", value)
    with pytest.raises(ValueError, match=rf"FASTPEFT_SPARSE_PATH must be one of \('auto', 'kernels', 'torch'\), "
                                         rf"got '{value}'"):
        OS.path_mode()


@pytest.mark.skipif(DEV != "cpu", reason="fakes CUDA timing on CPU tensors")
@pytest.mark.parametrize("op", ["sparse", "rosa"])
def test_sparse_ops_time_once_per_shape_bucket(sparse_env, op):
    """Through the ops, with CUDA's timing faked on CPU tensors: forward and backward are each timed once
    per shape bucket (M 33 and 40 share one, M 7 is another), the faster runs, and the results are the
    reference's. Here torch is faster in forward and the kernels in backward (RoSA's backward times three:
    kernels-dy1 too)."""
    mp = sparse_env
    mp.setattr(K, "INTERPRET", False)
    timed, backward = [], [False]
    # The candidates are the closures named kernels, kernels_dy1 (RoSA's backward) and composed (torch) in
    # ops/sparse.py.
    mp.setattr(K, "_bench", lambda fn: timed.append(fn.__name__) or (
        1.0 if fn.__name__ == ("kernels" if backward[0] else "composed") else 2.0))
    real_choose = OS.choose_path

    def choose(key, run, device):
        backward[0] = "bwd" in key[0]
        return real_choose(key, run, CUDA)  # as on a GPU; nested GEMM choices still see the CPU
    mp.setattr(OS, "choose_path", choose)
    calls = []
    _spy(mp, SD, KERNEL_PIECES, calls)
    _spy(mp, OS, TORCH_PIECES, calls)
    x, w, bias, a, bb, idx, vals = _sparse_inputs(16, 40, 64, 48)
    for m, new_keys in ((33, 2), (40, 0), (7, 2)):
        inputs = [x[:m], w, bias, a, bb, idx, vals]
        before = len(OS._path_cache)
        calls.clear()
        got = _sparse_run("triton", torch.float32, inputs, 16, op == "rosa")
        assert len(OS._path_cache) - before == new_keys
        if not new_keys:  # timing runs both candidates once; a cached choice runs only its own
            assert set(calls) == {"w_plus_delta_torch", "sddmm_blocks_op", "block_gemm_op"}, calls
        exact = _sparse_run("reference", torch.float64, inputs, 16, op == "rosa")
        for name, g_, e_ in zip(("y", "dx", "dvalues", "dA", "dB"), got, exact):
            assert_close_report(g_, e_, rtol=1e-5, atol=1e-5 * max(1.0, e_.abs().max().item()), what=f"M{m} {name}")
    # two keys (fwd, bwd) per bucket, two buckets; two candidates each, three in RoSA's backward
    assert len(timed) == 2 * (4 + (op == "rosa"))
    assert all(v == ("kernels" if "bwd" in key[0] else "torch") for key, v in OS._path_cache.items())
    rank = 8 if op == "rosa" else 0
    assert OS.chosen_paths(40, 64, 48, 16, idx.shape[0], rank) == {"fwd": {"torch"}, "bwd": {"kernels"}}
    assert OS.chosen_paths(40, 64, 48, 16, idx.shape[0], 8 - rank) == {"fwd": set(), "bwd": set()}  # the other op


@pytest.mark.skipif(DEV != "cpu", reason="fakes CUDA timing on CPU tensors")
def test_sparse_deterministic_mode_runs_the_kernels_untimed(sparse_env):
    mp = sparse_env
    mp.setattr(K, "INTERPRET", False)
    mp.setattr(K, "_bench", lambda fn: pytest.fail("timed in deterministic mode"))
    real_choose = OS.choose_path
    mp.setattr(OS, "choose_path", lambda key, run, device: real_choose(key, run, CUDA))
    calls = []
    _spy(mp, OS, TORCH_PIECES, calls)
    _spy(mp, K, ("dy_pass_op",), calls)  # nor RoSA's kernels-dy1
    with fastpeft.deterministic():
        for op in ("sparse", "rosa"):
            _sparse_run("triton", torch.float32, _sparse_inputs(1, 33, 130, 80), 1, op == "rosa", 0.1)
    assert not calls and not OS._path_cache


# ---- GPU only --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 32], ids=["b1", "b32"])
@pytest.mark.parametrize("op", ["sparse", "rosa"])
def test_gpu_sparse_floor_timed_on_the_card(sparse_env, op, b):
    """On the card, auto times kernels vs torch once per key (fwd, bwd), keeps the faster and matches the
    reference (bf16, 2x PyTorch's error); the second call times nothing."""
    timed = []
    real_bench = K._bench

    def bench(fn):  # the path's candidates only, not the nested GEMM choices (fused / dense / cublas ...)
        if fn.__name__ in ("kernels", "kernels_dy1", "composed"):
            timed.append(fn.__name__)
        return real_bench(fn)
    sparse_env.setattr(K, "_bench", bench)
    inputs = _sparse_inputs(b, 1024, 1024, 768, r=16, density=0.01 if b == 1 else 0.05)
    got = _sparse_run("triton", torch.bfloat16, inputs, b, op == "rosa", 0.1)
    n_timed = 4 + (op == "rosa")  # RoSA's backward times kernels-dy1 too
    assert len(timed) == n_timed and len(OS._path_cache) == 2, (timed, OS._path_cache)
    print(f"\n{op} b{b}: {OS._path_cache}")
    again = _sparse_run("triton", torch.bfloat16, inputs, b, op == "rosa", 0.1)
    assert len(timed) == n_timed
    same, exact = (_sparse_run("reference", dt, inputs, b, op == "rosa", 0.1) for dt in (torch.bfloat16, torch.float64))
    for name, g_, a_, s_, e_ in zip(("y", "dx", "dvalues", "dA", "dB"), got, again, same, exact):
        assert torch.equal(g_, a_), name
        err, base = (g_.double() - e_).abs().max().item(), (s_.double() - e_).abs().max().item()
        assert err <= 2 * base + 1e-3 * e_.abs().max().item(), f"{op} b{b} {name}: {err:.3g} vs {base:.3g}"


@pytest.mark.gpu
def test_gpu_sparse_ops_on_auto_once_in_auto_ops(sparse_env):
    """What adding the sparse ops to kernels.AUTO_OPS does (the one-line change): backend="auto" then runs
    SparseDeltaLinear and a RoSA layer on the kernels' floor for CUDA tensors, with the reference's numbers."""
    from fastpeft import functional

    sparse_env.setattr(kernels, "AUTO_OPS", kernels.AUTO_OPS | {"sparse_delta_linear", "lora_sparse_linear"})
    torch.manual_seed(0)
    sd = fastpeft.SparseDeltaLinear(512, 384, density=0.01).to(DEV)
    rosa = fastpeft.FastLoRALinear(512, 384, r=16, init_lora_weights=False, sparse_density=0.05,
                                   sparse_block_size=32).to(DEV)
    with torch.no_grad():
        sd.delta_values.normal_()
        for v in rosa.sparse_values.values():
            v.normal_()
    x = torch.randn(4, 64, 512, device=DEV)
    assert functional.resolve_backend("sparse_delta_linear", None, x, sd.weight) == "triton"
    for layer in (sd, rosa):
        layer.eval()
        params = [p for p in layer.parameters() if p.requires_grad]
        results = []
        for backend in ("auto", "reference"):
            with fastpeft.use_backend(backend):
                y = layer(x)
                results.append([y] + list(torch.autograd.grad(y.square().sum(), params)))
        for got, want in zip(*results):
            assert_close_report(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()),
                                what=type(layer).__name__)
    assert OS._path_cache  # the floor was timed


def test_doras_magnitude_partials_count_ys_tiles_in_shared_memory():
    """DoRA's fused backward with the magnitude's partials (DM_PART) pipelines y's (BLOCK_M, BLOCK_K) tiles beside
    dY's: compiled for sm_90 (triton 3.6, bf16), 128 x 128 x 64 w8 needs 263,800 B at 4 stages, over the card's
    232,448, and 197,728 B at 3. The prune keeps 3 stages and drops 4; without DM_PART both stay."""
    def stages(**flags):
        return sorted(c.num_stages for c in KT._prune_tma_configs(KT._TMA_CONFIGS, {}, R_PAD=16, SHRINK=True,
                                                                     DB_PART=True, K_SCALE=True, **flags))
    assert stages(DM_PART=False) == [2, 3, 4]
    assert stages(DM_PART=True) == [2, 3]


def test_fp32_at_full_precision_is_not_offered_the_tma_kernels(monkeypatch):
    """At torch's default fp32 matmul precision the kernels' dots are ieee (no tensor cores): compiled for sm_90,
    every TMA config kept for fp32 spilled 10-26 KiB a thread, so the ops do not offer the TMA paths there (cuBLAS's
    SGEMM is the floor); with TF32 allowed, and in 16-bit dtypes, they do. The interpreter offers them in every
    dtype (the tests run fp32 through them); a forced path (FASTPEFT_LORA_GEMM=tma / tma-shrink,
    FASTPEFT_MULTI_PATH=fused, FASTPEFT_SPARSE_GEMM=tma) in any."""
    monkeypatch.setattr(KT, "INTERPRET", False)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not KT.tma_precision_ok(torch.float32)
        assert KT.tma_precision_ok(torch.float32, forced=True)  # a path the environment forces runs in any dtype
        assert KT.tma_precision_ok(torch.bfloat16) and KT.tma_precision_ok(torch.float16)
        # the ops: the LoRA GEMM's candidates and the fused shrink, offered in fp32 only when forced
        monkeypatch.setattr(KT, "tma_supported", lambda device: True)
        a, b, lu, lv = torch.randn(8, 64), torch.randn(64, 48), torch.randn(8, 4), torch.randn(4, 48)
        x, w, la = torch.randn(OL.FUSED_SHRINK_MIN_ROWS, 48), torch.randn(40, 48), torch.randn(8, 48)
        assert tuple(OL.gemm_candidates(a, b, lu, lv, scale=1.0)) == ("fused", "cublas")
        assert not OL._fused_shrink_offered(x, w, la)
        assert OL._fused_shrink_offered(x.bfloat16(), w.bfloat16(), la.bfloat16())
        monkeypatch.setenv("FASTPEFT_LORA_GEMM", "tma-shrink")
        assert tuple(OL.gemm_candidates(a, b, lu, lv, scale=1.0)) == ("fused", "tma", "cublas")
        assert OL._fused_shrink_offered(x, w, la)
        monkeypatch.setenv("FASTPEFT_LORA_GEMM", "tma")
        assert tuple(OL.gemm_candidates(a, b, lu, lv, scale=1.0)) == ("fused", "tma", "cublas")
        monkeypatch.delenv("FASTPEFT_LORA_GEMM")
        # many adapters: the fused TMA forward refused in fp32 at full precision, unless forced
        from fastpeft.ops import multi as OM
        xs, ws = torch.randn(300, 64), torch.randn(48, 64)
        stacks = (torch.randn(2, 8, 64), torch.randn(2, 48, 8))
        assert "float32 at torch's default matmul precision" in OM._fused_refusal(xs, ws, None, *stacks, None)
        assert OM._fused_refusal(xs.bfloat16(), ws.bfloat16(), None, *(t.bfloat16() for t in stacks), None) is None
        monkeypatch.setenv("FASTPEFT_MULTI_PATH", "fused")
        assert OM._fused_refusal(xs, ws, None, *stacks, None) is None
        monkeypatch.delenv("FASTPEFT_MULTI_PATH")
        # sparse deltas: the TMA sparse GEMM likewise (untested before 2026-12-01)
        from fastpeft.ops.sparse import build_sparse_plan
        plan = build_sparse_plan(torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), 48, 64, 16)
        xa, wa, run = torch.randn(8, 64), torch.randn(48, 64), object()
        assert plan.csr_rows is not None
        assert OS._tma_way(plan, xa, wa, True, run) is None
        assert OS._tma_way(plan, xa.bfloat16(), wa.bfloat16(), True, run) is run
        monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "tma")
        assert OS._tma_way(plan, xa, wa, True, run) is run
        monkeypatch.delenv("FASTPEFT_SPARSE_GEMM")
        torch.set_float32_matmul_precision("high")
        assert OS._tma_way(plan, xa, wa, True, run) is run
        assert KT.tma_precision_ok(torch.float32)
        assert tuple(OL.gemm_candidates(a, b, lu, lv, scale=1.0)) == ("fused", "tma", "cublas")
    finally:
        torch.set_float32_matmul_precision(prev)
    monkeypatch.setattr(KT, "INTERPRET", True)
    assert KT.tma_precision_ok(torch.float32)


def test_the_timed_choices_take_do_bench_s_median(monkeypatch):
    """``kernels.lora._bench`` (every timed choice) and the profile script ask ``triton.testing.do_bench`` for the
    median, the statistic the README reports (its default is the mean, which one slow outlier moves)."""
    import importlib.util
    import os

    import triton.testing

    seen = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: seen.append(kw) or 1.0)
    assert K._bench(lambda: None) == 1.0
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "profile_lora.py")
    spec = importlib.util.spec_from_file_location("profile_lora_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.time_us(lambda: None, True) == 1e3  # its CUDA branch (do_bench faked here)
    assert [kw.get("return_mode") for kw in seen] == ["median", "median"]
