"""``fastpeft.lora_linear``: its values and gradients against the formula written out here (not against
``fastpeft.reference``, which is what ``auto`` runs on the CPU), the backend switch, argument checks,
seeds, dtypes and autocast."""
import pytest
import torch

import fastpeft
from conftest import assert_close_report
from fastpeft import kernels
from fastpeft.functional import current_backend, resolve_backend
from fastpeft.reference import cpu_keep_mask, dropout_mask

BACKENDS = ["reference"] + (["triton"] if kernels.HAS_TRITON and kernels.INTERPRET else [])


def _keep(backend, seed, rows, cols, p):
    """The 0/1 keep-mask a backend draws for (rows, cols) CPU tensors: the kernels' Philox stream
    (``dropout_mask``), or, on the reference backend, the CPU path's own stream (``cpu_keep_mask``)."""
    return (cpu_keep_mask if backend == "reference" else dropout_mask)(seed, rows, cols, p)


def _args(m=7, k=48, n=80, r=8, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    bb = (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype)
    return x, w, b, a, bb


def _formula(x, w, b, a, bb, s, keep=None, p=0.0):
    """y = x W^T + b + s (drop(x) A^T) B^T in fp64, drop(x) = keep * x / (1 - p) (keep: the 0/1 mask)."""
    x, w, a, bb = (t.double() for t in (x, w, a, bb))
    xd = x if keep is None else keep.double() * x / (1 - p)
    y = x @ w.T + s * (xd @ a.T) @ bb.T
    return y + b.double() if b is not None else y


def _formula_grads(dy, x, w, a, bb, s, keep=None, p=0.0):
    """The gradients of ``_formula`` given dY, written out (fp64):
    dX = dY W + s keep * (dY B A) / (1 - p);  dA = s (dY B)^T drop(x);  dB = s dY^T (drop(x) A^T);
    dW = dY^T x;  db = sum_m dY."""
    dy, x, w, a, bb = (t.double() for t in (dy, x, w, a, bb))
    keep = torch.ones_like(x) if keep is None else keep.double()
    xd = keep * x / (1 - p)
    return {"x": dy @ w + s * keep * (dy @ bb @ a) / (1 - p), "lora_A": s * (dy @ bb).T @ xd,
            "lora_B": s * dy.T @ (xd @ a.T), "weight": dy.T @ x, "bias": dy.sum(0)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,bias,p", [(7, True, 0.0), (33, False, 0.0), (7, True, 0.3), (1, True, 0.5)],
                         ids=["M7-bias", "M33-nobias", "M7-bias-p0.3", "M1-bias-p0.5"])
def test_values_and_gradients_follow_the_formula(m, bias, p, backend):
    """Output and every gradient (x, A, B, W, b) against the formula in fp64, dropout's keep-mask being
    ``_keep`` (the backend's stream); x with a leading batch dim."""
    x, w, b, a, bb = _args(m=2 * m, bias=bias)
    s, seed = 0.75, 11
    x3 = x.view(2, m, -1).requires_grad_()
    leaves = {"x": x3, "weight": w, "lora_A": a, "lora_B": bb} | ({"bias": b} if bias else {})
    for t in leaves.values():
        t.requires_grad_()
    keep = _keep(backend, seed, 2 * m, x.shape[1], p) if p > 0 else None
    y = fastpeft.lora_linear(x3, w, b, a, bb, s, dropout_p=p, seed=seed, backend=backend)
    assert y.shape == (2, m, w.shape[0])
    want = _formula(x, w, b, a, bb, s, keep, p)
    what = f"{backend}-M{m}-p{p}"
    assert_close_report(y.reshape(2 * m, -1), want, rtol=1e-5, atol=1e-5, what=f"{what} y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))
    want_grads = _formula_grads(dy.reshape(2 * m, -1), x, w, a, bb, s, keep, p)
    for name, g in grads.items():
        # A gradient element is a sum over the rows: fp32 rounding follows the size of the summands, not of
        # the sum, so an element that cancels carries the absolute error of the largest ones (measured: 1.2e-5
        # on 0.19 for dA, the CPU path summing in another order than autograd). atol scales with the tensor.
        want_g = want_grads[name]
        assert_close_report(g.reshape(want_g.shape), want_g, rtol=1e-5, atol=1e-5 * max(1.0, want_g.abs().max().item()),
                            what=f"{what} d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_drops_nothing(backend):
    """training=False: the formula without dropout, whatever dropout_p and seed say."""
    x, w, b, a, bb = _args()
    y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=False, seed=3, backend=backend)
    assert_close_report(y, _formula(x, w, b, a, bb, 2.0), rtol=1e-5, atol=1e-5, what=f"{backend} eval")


def test_matches_reference_and_backprops():
    x, w, b, a, bb = _args()
    a.requires_grad_()
    bb.requires_grad_()
    y = fastpeft.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.1, seed=4)
    keep = _keep("reference", 4, x.shape[0], x.shape[1], 0.1)  # auto on CPU tensors: the CPU path
    assert_close_report(y, _formula(x, w, b, a, bb, 0.5, keep, 0.1), rtol=1e-5, atol=1e-5, what="auto y")
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None


def test_backend_precedence(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    assert current_backend() == "auto"
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")
    assert current_backend() == "reference"
    with fastpeft.use_backend("auto"):
        assert current_backend() == "auto"  # the block beats the environment
        with fastpeft.use_backend("triton"):
            assert current_backend() == "triton"
            assert current_backend("reference") == "reference"  # the call beats the block
        assert current_backend() == "auto"
    assert current_backend() == "reference"


def test_auto_runs_reference_on_cpu_tensors():
    x, w, b, a, bb = _args()
    assert resolve_backend("lora_linear", "auto", x, w, a, bb) == "reference"


def test_triton_backend_raises_clearly_instead_of_falling_back(monkeypatch):
    x, w, b, a, bb = _args()
    monkeypatch.setattr(kernels, "INTERPRET", False)  # CPU tensors, no interpreter: triton cannot run
    with pytest.raises(RuntimeError, match="backend 'triton' is not available.*TRITON_INTERPRET=1"):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    with fastpeft.use_backend("triton"), pytest.raises(RuntimeError, match="not available"):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="not available"):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.setattr(kernels, "TRITON_IMPORT_ERROR", "ImportError: no triton")
    with pytest.raises(RuntimeError, match="no triton"):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0)
    assert resolve_backend("lora_linear", "auto", x, w) == "reference"  # auto never raises


def test_bad_backend_names(monkeypatch):
    x, w, b, a, bb = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="use_backend"):
        with fastpeft.use_backend("fast"):
            pass
    monkeypatch.setenv("FASTPEFT_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0)


def _bad_cases():
    x, w, b, a, bb = _args()
    return {
        "x-last-dim": ((torch.randn(7, 47), w, b, a, bb, 1.0), ValueError, r"in_features=48, got 47"),
        "x-0d": ((torch.tensor(1.0), w, b, a, bb, 1.0), ValueError, "x's last dim"),
        "x-int": ((x.long(), w, b, a, bb, 1.0), ValueError, "x must be float32"),
        "triton-fp64": ((x.double(), w.double(), b.double(), a.double(), bb.double(), 1.0, 0.0, True, None, "triton"),
                        RuntimeError, "kernels take float32, float16 or bfloat16 tensors, got torch.float64"),
        "weight-1d": ((x, w[0], b, a, bb, 1.0), ValueError, "weight must be 2-D"),
        "lora_A-in": ((x, w, b, a[:, :40], bb, 1.0), ValueError, r"lora_A must have shape \(8, 48\)"),
        "lora_B-out": ((x, w, b, a, bb[:70], 1.0), ValueError, r"lora_B must have shape \(80, 8\)"),
        "lora_B-rank": ((x, w, b, a, bb[:, :4], 1.0), ValueError, r"lora_B must have shape \(80, 8\)"),
        "bias-shape": ((x, w, b[:5], a, bb, 1.0), ValueError, r"bias must have shape \(80,\)"),
        "dtype": ((x, w, b, a.double(), bb, 1.0), ValueError, "lora_A must have x's dtype torch.float32"),
        "device": ((x, w.to("meta"), b, a, bb, 1.0), ValueError, "weight must be on x's device"),
        "scaling-nan": ((x, w, b, a, bb, float("nan")), ValueError, "scaling must be a finite number"),
        "scaling-tensor": ((x, w, b, a, bb, torch.tensor(1.0)), TypeError, "scaling must be a Python number"),
        "x-not-tensor": ((x.tolist(), w, b, a, bb, 1.0), TypeError, "x must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_name_the_argument(case):
    args, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        fastpeft.lora_linear(*args)


@pytest.mark.parametrize("kw,msg", [({"dropout_p": 1.0}, "dropout_p must be a float in"),
                                    ({"dropout_p": -0.1}, "dropout_p"),
                                    ({"seed": -3}, "seed must be None or an int"),
                                    ({"training": 1}, "training must be a bool")])
def test_bad_keyword_arguments(kw, msg):
    x, w, b, a, bb = _args()
    with pytest.raises((ValueError, TypeError), match=msg):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0, **kw)


def test_seed_none_draws_from_torch_generator():
    x, w, b, a, bb = _args()
    torch.manual_seed(0)
    y1 = fastpeft.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5)
    y2 = fastpeft.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5)
    torch.manual_seed(0)
    y3 = fastpeft.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5)
    assert not torch.equal(y1, y2)
    torch.testing.assert_close(y1, y3, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_within_twice_pytorch(dtype):
    """The op in a low dtype is as accurate as PyTorch's own F.linear chain in that dtype."""
    x, w, b, a, bb = _args(33, 80, 48, 16)
    exact = _formula(x, w, b, a, bb, 0.5)
    low = fastpeft.lora_linear(*(t.to(dtype) for t in (x, w, b, a, bb)), 0.5)
    torch_low = (torch.nn.functional.linear(x.to(dtype), w.to(dtype), b.to(dtype))
                 + 0.5 * ((x.to(dtype) @ a.to(dtype).T) @ bb.to(dtype).T))
    assert low.dtype == dtype
    err = (low.double() - exact).abs().max().item()
    torch_err = (torch_low.double() - exact).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_autocast_cpu_bf16_behaves_like_linear():
    x, w, b, a, bb = _args()
    lin = torch.nn.Linear(48, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.lora_linear(x, w, b, a, bb, 1.0)
        ref = lin(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    exact = _formula(x, w, b, a, bb, 1.0).float()
    torch.testing.assert_close(y.float(), exact, rtol=2e-2, atol=5e-2)


def test_auto_runs_only_gpu_checked_ops_on_kernels(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.setattr(kernels, "INTERPRET", True)
    cuda_like = type("T", (), {"device": torch.device("cuda"), "dtype": torch.float32})()
    monkeypatch.setattr("fastpeft.functional.triton_unavailable_reason", lambda op, *t: None)
    assert resolve_backend("lora_linear", "auto", cuda_like) == "triton"
    assert resolve_backend("sparse_delta_linear", "auto", cuda_like) == "reference"  # not GPU-checked yet
    assert resolve_backend("sparse_delta_linear", "triton", x) == "triton"
