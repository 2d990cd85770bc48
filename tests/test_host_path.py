"""The eager host path of ``lora_linear`` at decode sizes: argument sets that passed the checks are
cached by what the checks read, so a bad call is still refused after a good one of the same shapes; calls
with nothing to differentiate skip the autograd Function and give the same output."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft import _checks  # noqa: E402
from fastpeft import kernels  # noqa: E402

if not kernels.INTERPRET and not torch.cuda.is_available():
    pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastpeft.ops import lora as OL  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"


def _args(m=3, k=16, n=24, r=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).to(DEV) for s in ((m, k), (n, k), (n,), (r, k), (n, r))]


def test_a_cached_good_call_does_not_let_a_bad_one_through():
    x, w, b, a, bb = _args()
    fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="reference")
    assert _checks._lora_args_key(x, w, b, a, bb, 2.0, 0.0) in _checks._LORA_ARGS_OK
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        fastpeft.lora_linear(x, w, b, a, bb, float("nan"), backend="reference")
    with pytest.raises(TypeError, match="scaling must be a Python number"):
        fastpeft.lora_linear(x, w, b, a, bb, torch.tensor(2.0), backend="reference")
    with pytest.raises(ValueError, match="lora_B must have shape"):
        fastpeft.lora_linear(x, w, b, a, bb[:, :3], 2.0, backend="reference")
    with pytest.raises(ValueError, match="bias must have x's dtype"):
        fastpeft.lora_linear(x, w, b.double(), a, bb, 2.0, backend="reference")
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=1.0, backend="reference")


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
def test_no_grad_calls_skip_the_function_and_match(monkeypatch, p):
    x, w, b, a, bb = _args()
    a.requires_grad_()
    want = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, seed=7, backend="triton").detach()
    applied = []
    apply = OL.LoRALinearFunction.apply
    monkeypatch.setattr(OL.LoRALinearFunction, "apply", lambda *t: applied.append(1) or apply(*t))
    with torch.no_grad():
        got = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, seed=7, backend="triton")
    assert not applied
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, seed=7, backend="triton")
    assert applied  # with a parameter to differentiate, the Function runs
