"""The timed choice (``kernels.lora.timed_choice``) and its LoRA uses: the GEMM of the kernel path (fused /
TMA / cuBLAS, ``ops.lora.gemm_candidates``) and the whole forward / backward (kernels / torch composition,
``ops.lora.choose_path``). Timers are faked: the fastest candidate wins, candidates that cannot run are
never offered, forced and deterministic modes hold. Each forced path is also run against the reference."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft import kernels  # noqa: E402

if not kernels.INTERPRET and not torch.cuda.is_available():
    pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastpeft.kernels import lora as K  # noqa: E402
from fastpeft.kernels import lora_tma as KT  # noqa: E402
from fastpeft.ops import lora as OL  # noqa: E402
from fastpeft.reference import lora_linear_ref  # noqa: E402

from conftest import assert_close_report  # noqa: E402

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


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("gemm", ["fused", "tma", "cublas", "torch"])
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


@pytest.mark.parametrize("fwd,bwd", [("torch", "kernels"), ("kernels", "torch")])
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
