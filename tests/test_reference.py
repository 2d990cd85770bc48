"""The reference LoRA op against float64 math written out by hand, its gradients, and its dropout."""
import pytest
import torch

from conftest import assert_close_report
from fastpeft.reference import (dropout_mask, dropout_threshold, lora_dropout_ref, lora_linear_ref, philox4x,
                                philox_randint, philox_stream)

SHAPES = [(1, 48, 80, 1), (7, 80, 48, 8), (33, 130, 48, 16), (100, 48, 130, 24)]


def _ids(shapes):
    return [f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in shapes]


def _make(m, k, n, r, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype) / k ** 0.5
    b = torch.randn(n, generator=g, dtype=dtype) if bias else None
    a = torch.randn(r, k, generator=g, dtype=dtype) / k ** 0.5
    bb = torch.randn(n, r, generator=g, dtype=dtype) / r ** 0.5
    return x, w, b, a, bb


def _by_hand(x, w, b, a, bb, s, keep=None, p=0.0):
    """Element sums in float64, no F.linear: y[m, n] = sum_k x w + b + s sum_j (sum_k xd a) bb."""
    x, w, a, bb = x.double(), w.double(), a.double(), bb.double()
    xd = x if keep is None else x * keep.double() / (1 - p)
    y = (x[:, None, :] * w[None, :, :]).sum(-1)
    u = (xd[:, None, :] * a[None, :, :]).sum(-1)
    y = y + s * (u[:, None, :] * bb[None, :, :]).sum(-1)
    return y if b is None else y + b.double()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,k,n,r", SHAPES, ids=_ids(SHAPES))
def test_forward_matches_float64_math(m, k, n, r, bias):
    x, w, b, a, bb = _make(m, k, n, r, torch.float32, bias)
    y = lora_linear_ref(x, w, b, a, bb, scaling=0.75)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert_close_report(y, _by_hand(x, w, b, a, bb, 0.75), rtol=1e-5, atol=1e-5, what="y")


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("m,k,n,r", SHAPES[:3], ids=_ids(SHAPES[:3]))
def test_dropout_forward_matches_float64_math(m, k, n, r, p):
    x, w, b, a, bb = _make(m, k, n, r, torch.float32)
    keep = dropout_mask(123, m, k, p)
    y = lora_linear_ref(x, w, b, a, bb, 2.0, dropout_p=p, training=True, seed=123)
    assert_close_report(y, _by_hand(x, w, b, a, bb, 2.0, keep, p), rtol=1e-5, atol=1e-5, what="y")


@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_every_gradient_gradcheck(bias, p):
    x, w, b, a, bb = _make(5, 12, 9, 3, torch.float64, bias)
    args = [t.requires_grad_() for t in (x, w, b, a, bb) if t is not None]

    def f(x, w, *rest):
        b = rest[0] if bias else None
        a, bb = rest[-2:]
        return lora_linear_ref(x, w, b, a, bb, 1.5, dropout_p=p, training=True, seed=7)

    assert torch.autograd.gradcheck(f, args)


def test_gradients_match_closed_form():
    """dX = dY W + s (mask * (dY B) A)/(1-p); dA = s (dY B)^T drop(X); dB = s dY^T (drop(X) A^T)."""
    p, s = 0.3, 1.25
    x, w, b, a, bb = _make(33, 48, 80, 8, torch.float64)
    for t in (x, w, b, a, bb):
        t.requires_grad_()
    y = lora_linear_ref(x, w, b, a, bb, s, dropout_p=p, training=True, seed=11)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = dropout_mask(11, 33, 48, p).double()
    xd = x.detach() * keep / (1 - p)
    v = dy @ bb.detach()
    torch.testing.assert_close(x.grad, dy @ w.detach() + s * keep * (v @ a.detach()) / (1 - p))
    torch.testing.assert_close(a.grad, s * v.T @ xd)
    torch.testing.assert_close(bb.grad, s * dy.T @ (xd @ a.detach().T))
    torch.testing.assert_close(w.grad, dy.T @ x.detach())
    torch.testing.assert_close(b.grad, dy.sum(0))


def test_leading_dims_and_noncontiguous_input():
    x, w, b, a, bb = _make(2 * 3 * 5, 48, 80, 8, torch.float32)
    x3 = x.view(2, 3, 5, 48)
    y = lora_linear_ref(x3, w, b, a, bb, 0.5, dropout_p=0.2, seed=3)
    assert y.shape == (2, 3, 5, 80)
    flat = lora_linear_ref(x, w, b, a, bb, 0.5, dropout_p=0.2, seed=3)
    torch.testing.assert_close(y.reshape(-1, 80), flat)
    # A non-contiguous view of the same logical values gives the same result (mask by logical position).
    xt = x3.transpose(0, 2).contiguous().transpose(0, 2)
    assert not xt.is_contiguous()
    torch.testing.assert_close(lora_linear_ref(xt, w, b, a, bb, 0.5, dropout_p=0.2, seed=3), y)
    xs = torch.randn(30, 96)[:, ::2]
    assert not xs.is_contiguous()
    torch.testing.assert_close(lora_linear_ref(xs, w, b, a, bb, 0.5),
                               lora_linear_ref(xs.contiguous(), w, b, a, bb, 0.5))


def test_dropout_touches_lora_branch_only_and_only_in_training():
    x, w, b, a, bb = _make(7, 48, 80, 8, torch.float32)
    base = torch.nn.functional.linear(x, w, b)
    zero_b = torch.zeros_like(bb)
    torch.testing.assert_close(lora_linear_ref(x, w, b, a, zero_b, 1.0, dropout_p=0.5, seed=1), base)
    train = lora_linear_ref(x, w, b, a, bb, 1.0, dropout_p=0.5, training=True, seed=1)
    evals = lora_linear_ref(x, w, b, a, bb, 1.0, dropout_p=0.5, training=False)
    torch.testing.assert_close(evals, lora_linear_ref(x, w, b, a, bb, 1.0))
    assert not torch.allclose(train, evals)


def test_dropout_requires_seed():
    x, w, b, a, bb = _make(2, 8, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="seed"):
        lora_linear_ref(x, w, b, a, bb, 1.0, dropout_p=0.1, training=True, seed=None)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_scale(p):
    keep = dropout_mask(2024, 512, 512, p)
    rate = keep.double().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, rate
    x = torch.ones(64, 256)
    xd = lora_dropout_ref(x, p, seed=5)
    assert bool(((xd == 0) | (xd == torch.tensor(1 / (1 - p)))).all())
    torch.testing.assert_close(xd[xd != 0], torch.full_like(xd[xd != 0], 1 / (1 - p)))


def test_dropout_mask_is_a_pure_function_of_seed():
    a = dropout_mask(99, 33, 80, 0.3)
    torch.testing.assert_close(a, dropout_mask(99, 33, 80, 0.3))
    assert not torch.equal(a, dropout_mask(100, 33, 80, 0.3))
    # Rows are laid out as one flat counter: the first rows of a taller mask are the same mask.
    torch.testing.assert_close(dropout_mask(99, 40, 80, 0.3)[:33], a)
    assert dropout_threshold(0.0) == 0 and dropout_threshold(0.5) == 2**31
    with pytest.raises(ValueError, match="seed"):
        philox_randint(-1, torch.arange(4))


def test_mask_stream_uses_all_four_words_of_each_block():
    words = philox4x(31, torch.arange(3))
    stream = philox_stream(31, 10)
    assert stream.tolist() == [int(words[e % 4][e // 4]) for e in range(10)]
    keep = dropout_mask(31, 2, 5, 0.5)
    assert keep.flatten().tolist() == [v >= 2**31 for v in stream.tolist()]


def test_philox_matches_known_values():
    # Philox4x32-10, key (seed) 0 and 12345, counters 0..2; the values triton.language.randint returns.
    assert philox_randint(0, torch.arange(3)).tolist() == [1713891541, 4175744164, 83534633]
    assert philox_randint(12345, torch.arange(3)).tolist() == [3522838145, 11954473, 1814877333]


def test_philox_matches_triton_randint_bit_for_bit():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from fastpeft import kernels

    if not kernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    dev = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"

    @triton.jit
    def _randint_kernel(out_ptr, seed, base, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r = tl.randint(seed, base + offs.to(tl.int64))
        tl.store(out_ptr + offs, r.to(tl.int64) & 0xFFFFFFFF)

    @triton.jit
    def _randint4x_kernel(out_ptr, seed, base, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        c0, c1, c2, c3 = tl.randint4x(seed, base + offs.to(tl.int64))
        tl.store(out_ptr + offs, c0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 256 + offs, c1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 512 + offs, c2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 768 + offs, c3.to(tl.int64) & 0xFFFFFFFF)

    for seed in (0, 7, 2**40 + 3, 2**62 + 1):
        for base in (0, 2**32 - 64):  # crossing into the counter's high word
            out = torch.empty(256, dtype=torch.int64, device=dev)
            _randint_kernel[(2,)](out, seed, base, BLOCK=128)
            counters = torch.arange(base, base + 256, device=dev)
            assert torch.equal(out, philox_randint(seed, counters)), (seed, base)
            out4 = torch.empty(1024, dtype=torch.int64, device=dev)
            _randint4x_kernel[(2,)](out4, seed, base, BLOCK=128)
            assert torch.equal(out4, torch.cat(philox4x(seed, counters))), (seed, base)
