"""``FastLoRALinear``: construction, storage sharing, inits, forward, merge / unmerge, adapter ids."""
import math

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import FastLoRALinear


def _layer(in_f=48, out_f=80, r=8, **kw):
    torch.manual_seed(0)
    return FastLoRALinear(in_f, out_f, r=r, init_lora_weights=False, **kw)


def test_attributes_shapes_and_frozen_base():
    layer = FastLoRALinear(48, 80, r=4, lora_alpha=16, lora_dropout=0.1)
    assert (layer.in_features, layer.out_features, layer.r, layer.lora_alpha) == (48, 80, 4, 16)
    assert layer.lora_dropout == 0.1 and isinstance(layer.lora_dropout, float)
    assert layer.scaling == 4.0 and layer.merged is False and layer.adapter_names == ["default"]
    assert layer.weight.shape == (80, 48) and layer.bias.shape == (80,)
    assert layer.lora_A.shape == (4, 48) and layer.lora_B.shape == (80, 4)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A_adapters.default", "lora_B_adapters.default"}
    assert layer.lora_A is layer.lora_A_adapters["default"] and isinstance(layer.lora_A, nn.Parameter)
    assert FastLoRALinear(48, 80, bias=False).bias is None


def test_rslora_scaling():
    assert FastLoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))
    assert FastLoRALinear(8, 8, r=16, lora_alpha=8).scaling == pytest.approx(0.5)


def test_from_linear_shares_storage_and_freezes():
    lin = nn.Linear(48, 80)
    layer = FastLoRALinear.from_linear(lin, r=8, lora_alpha=16)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), lin(x))  # B = 0: starts as its base
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        FastLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_from_linear_keeps_dtype(dtype):
    layer = FastLoRALinear.from_linear(nn.Linear(16, 24, dtype=dtype), r=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == dtype
    y = layer(torch.randn(3, 16, dtype=dtype))
    assert y.dtype == dtype


def test_inits():
    torch.manual_seed(0)
    default = FastLoRALinear(256, 64, r=16)
    assert torch.count_nonzero(default.lora_B) == 0 and torch.count_nonzero(default.lora_A) > 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in))
    assert default.lora_A.abs().max() <= bound
    gauss = FastLoRALinear(256, 64, r=16, init_lora_weights="gaussian")
    assert torch.count_nonzero(gauss.lora_B) == 0
    assert gauss.lora_A.std().item() == pytest.approx(1 / 16, rel=0.1)
    rand = FastLoRALinear(256, 64, r=16, init_lora_weights=False)
    assert torch.count_nonzero(rand.lora_B) > 0


@pytest.mark.parametrize("kw,exc,msg", [
    ({"r": 0}, ValueError, "r must be a positive int, got 0"),
    ({"r": 2.5}, ValueError, "r must be a positive int"),
    ({"lora_dropout": 1.0}, ValueError, r"lora_dropout must be a float in \[0, 1\), got 1.0"),
    ({"lora_dropout": -0.5}, ValueError, "lora_dropout"),
    ({"lora_alpha": float("inf")}, ValueError, "lora_alpha must be a finite number"),
    ({"init_lora_weights": "mica"}, ValueError, "init_lora_weights must be one of"),
    ({"use_rslora": "yes"}, TypeError, "use_rslora must be a bool"),
], ids=["r0", "r-float", "dropout1", "dropout-neg", "alpha-inf", "init-mica", "rslora-str"])
def test_bad_constructor_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        FastLoRALinear(8, 8, **kw)
    with pytest.raises(exc, match=msg):
        FastLoRALinear.from_linear(nn.Linear(8, 8), **kw)


def test_wrong_input_size_names_both_sizes():
    with pytest.raises(ValueError, match="in_features=48, got 40"):
        _layer()(torch.randn(3, 40))


def _formula(x, weight, bias, lora_A, lora_B, scaling, keep=None, p=0.0):
    """``y = x W^T + b + s * (drop(x) A^T) B^T`` written out in float64, ``drop(x) = x * keep / (1 - p)``:
    the expected values, independent of ``fastpeft.reference`` (which is what "auto" runs on the CPU)."""
    x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
    dropped = x if keep is None else x * keep.double() / (1.0 - p)
    y = x @ weight.T + scaling * ((dropped @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias.double()


def _leaf64(t):
    return t.detach().double().requires_grad_()


@pytest.mark.parametrize("mode", ["eval-p0.2", "train-p0"])
@pytest.mark.parametrize("shape", [(1, 48), (2, 3, 48), (4, 1, 5, 48)], ids=["2d", "3d", "4d"])
def test_forward_and_gradients_match_formula(shape, mode):
    """Output and the gradients of x, A and B against the fp64 formula, with scaling = 16 / 8 written out."""
    layer = _layer(lora_alpha=16, lora_dropout=0.2 if mode == "eval-p0.2" else 0.0)
    layer.train(mode == "train-p0")
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    x64, a64, b64 = _leaf64(x), _leaf64(layer.lora_A), _leaf64(layer.lora_B)
    want = _formula(x64, layer.weight, layer.bias, a64, b64, 2.0)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    expected = torch.autograd.grad(want, (x64, a64, b64), dy.double())
    for name, g, w in zip(("x", "lora_A", "lora_B"), got, expected):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_dropout_matches_formula_and_is_seeded():
    """Dropout on the LoRA branch only, scaled by 1 / (1 - p); the mask is the seed's in the CPU path's
    stream (``cpu_keep_mask``: CPU tensors on the reference backend)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 48, requires_grad=True), torch.randn(80, 48), torch.randn(80)
    a, bb = torch.randn(8, 48, requires_grad=True), torch.randn(80, 8, requires_grad=True)
    y = fastpeft.lora_linear(x, w, b, a, bb, 1.5, dropout_p=0.25, seed=11)
    keep = fastpeft.reference.cpu_keep_mask(11, 5, 48, 0.25)
    assert 0 < int(keep.sum()) < keep.numel()
    x64, a64, b64 = _leaf64(x), _leaf64(a), _leaf64(bb)
    want = _formula(x64, w, b, a64, b64, 1.5, keep, 0.25)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y.sum(), (x, a, bb))
    expected = torch.autograd.grad(want.sum(), (x64, a64, b64))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
    # The layer in training draws its seed from torch's generator: one manual_seed, one mask.
    layer = _layer(lora_alpha=16, lora_dropout=0.2)
    xs = torch.randn(2, 3, 48)
    torch.manual_seed(3)
    y1 = layer(xs)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(xs), y1)
    assert not torch.allclose(y1.double(), _formula(xs, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 2.0))


def test_gradients_reach_only_lora_parameters():
    layer = _layer()
    x = torch.randn(7, 48, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None


def test_training_reduces_loss():
    torch.manual_seed(0)
    layer = FastLoRALinear(32, 16, r=4, lora_alpha=8)
    target = nn.Linear(32, 16)
    x = torch.randn(64, 32)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    losses = []
    for _ in range(50):
        loss = (layer(x) - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_merge_unmerge_round_trip():
    layer = _layer(lora_alpha=16)
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 48)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight, w0 + layer.scaling * layer.lora_B @ layer.lora_A)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x, adapter_ids=torch.zeros(6, dtype=torch.long))
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("kind", ["lora", "dora", "rosa"])
def test_fp64_merge_keeps_fp64_precision(kind):
    """An fp64 layer merges and unmerges in fp64 (in fp32 the merged output was 1e-7 off, PEFT's 1e-15)."""
    torch.manual_seed(0)
    kw = {"dora": dict(use_dora=True), "rosa": dict(sparse_density=0.1)}.get(kind, {})
    layer = FastLoRALinear.from_linear(torch.nn.Linear(48, 40).double(), r=4, init_lora_weights=False, **kw)
    if kind == "rosa":
        with torch.no_grad():
            layer.sparse_values["default"].normal_()
    w0, x = layer.weight.detach().clone(), torch.randn(6, 48, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert (layer(x) - y).abs().max() < 1e-13
        layer.unmerge()
    assert (layer.weight - w0).abs().max() < 1e-14


def test_merge_writes_through_to_shared_linear():
    lin = nn.Linear(16, 8)
    w0 = lin.weight.detach().clone()
    layer = FastLoRALinear.from_linear(lin, r=2, init_lora_weights=False)
    layer.merge()
    assert not torch.equal(lin.weight, w0)


def test_to_linear_is_a_merged_copy():
    layer = _layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 48)
    lin = layer.to_linear()
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(x), layer(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, w0) and not layer.merged
    assert lin.weight.data_ptr() != layer.weight.data_ptr()
    layer.merge()
    torch.testing.assert_close(layer.to_linear().weight, layer.weight)
    assert FastLoRALinear(8, 4, bias=False).to_linear().bias is None


def test_adapter_ids_route_rows():
    layer = _layer().eval()
    x = torch.randn(2, 5, 48)
    with_adapter = layer(x)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    ids = torch.tensor([[0, -1, 0, -1, -1], [-1, -1, 0, 0, 0]])
    y = layer(x, adapter_ids=ids)
    sel = (ids == 0).unsqueeze(-1)
    torch.testing.assert_close(y, torch.where(sel, with_adapter, base))
    per_seq = layer(x, adapter_ids=torch.tensor([0, -1]))
    torch.testing.assert_close(per_seq[0], with_adapter[0])
    torch.testing.assert_close(per_seq[1], base[1])


@pytest.mark.parametrize("ids,exc,msg", [
    (torch.tensor([[0, 1, 0, 0, 0]] * 2), ValueError, r"adapter_ids must be in \[-1, 0\]"),
    (torch.tensor([[0, -2, 0, 0, 0]] * 2), ValueError, r"adapter_ids must be in \[-1, 0\]"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"adapter_ids must have shape \(2, 5\)"),
    (torch.zeros(2, 5), TypeError, "adapter_ids must be an int64/int32 tensor"),
], ids=["too-big", "below-minus-one", "wrong-shape", "float"])
def test_bad_adapter_ids(ids, exc, msg):
    with pytest.raises(exc, match=msg):
        _layer()(torch.randn(2, 5, 48), adapter_ids=ids)


def test_state_dict_and_repr():
    layer = FastLoRALinear(8, 4, r=2)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A_adapters.default", "lora_B_adapters.default"}
    assert "r=2" in repr(layer) and "scaling" in repr(layer)


def test_uses_backend_switch(monkeypatch):
    from fastpeft import kernels

    layer = _layer(lora_dropout=0.1)
    x = torch.randn(2, 3, 48)
    # The reference backend on CPU draws its mask from the CPU stream; the kernels' (Philox) stream is that
    # of lora_linear_ref, the oracle: the same seed (drawn from torch's generator) gives the same mask.
    torch.manual_seed(1)
    seed = fastpeft.functional.draw_seed()
    ref = fastpeft.lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, 0.1,
                                   True, seed)
    with fastpeft.use_backend("triton"):
        torch.manual_seed(1)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)  # same seed, same mask
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with fastpeft.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        layer(x)
