"""LoRA on convolutions: ``fastpeft.lora_conv`` against its oracle ``lora_conv_ref`` (outputs and every gradient,
dropout included, every geometry), ``FastLoRAConv`` and ``inject`` against PEFT's ``lora.Conv1d`` / ``Conv2d`` /
``Conv3d`` (outputs, gradients, init draws, merge, files both ways), many adapters per batch, the eval-mode folded
kernel and what the op keeps for backward."""
import copy

import pytest
import torch
import torch.nn as nn

import fastpeft
from conftest import assert_close_to_largest as _close
from fastpeft import FastLoRAConv, LoraConfig

peft = pytest.importorskip("peft")

GEOMETRIES = [  # (spatial dims, kernel, stride, padding, dilation)
    (2, 3, 1, 1, 1),
    (2, 3, 2, (1, 0), 1),
    (2, 1, 1, 0, 2),     # a dilated 1x1 kernel: A's output has the base's shape
    (1, 5, 2, 2, 1),
    (3, 3, 1, "same", 1),
    (2, 4, 1, "same", 1),  # an even kernel: "same" pads unevenly -> the autograd composition
    (2, 3, 1, "valid", 1),
]


def _args(d, k, rows, out, r=4, c=6, dtype=torch.float64, size=9):
    g = torch.Generator().manual_seed(rows * 100 + out + d)
    t = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (t(rows, c, *(size,) * d).requires_grad_(), t(out, c, *(k,) * d).requires_grad_(),
            t(out).requires_grad_(), t(r, c, *(k,) * d).requires_grad_(), t(out, r).requires_grad_())


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows,out", [(1, 5), (7, 300)])  # the rank-r convolution beside W, and W + sBA folded
def test_lora_conv_matches_oracle_fp64_forward_and_every_gradient(geo, p, rows, out):
    d, k, stride, padding, dilation = geo
    ins = _args(d, k, rows, out)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    y = fastpeft.lora_conv(*ins, 0.7, p, True, seed=11, **kw)
    ref = fastpeft.lora_conv_ref(*ins, 0.7, p, True, 11, cpu_stream=True, **kw)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, ins, dy), torch.autograd.grad(ref, ins, dy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)
    with torch.no_grad():  # the no-grad forward (folded where cheaper)
        torch.testing.assert_close(fastpeft.lora_conv(*ins, 0.7, p, True, seed=11, **kw), ref, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_conv_low_precision_error_within_twice_torchs(dtype):
    ins64 = _args(2, 3, 7, 300)
    ref = fastpeft.lora_conv_ref(*ins64, 0.5, 0.0, True, None, padding=1)
    dy = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, ins64, dy)
    low = tuple(t.detach().to(dtype).requires_grad_() for t in ins64)
    ours = fastpeft.lora_conv(*low, 0.5, padding=1)
    torchs = fastpeft.lora_conv_ref(*low, 0.5, 0.0, True, None, padding=1)
    err = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert err(ours, ref) <= 2 * err(torchs, ref) + 1e-6
    for g_ours, g_torch, g_ref in zip(torch.autograd.grad(ours, low, dy.to(dtype)),
                                      torch.autograd.grad(torchs, low, dy.to(dtype)), grads_ref):
        assert err(g_ours, g_ref) <= 2 * err(g_torch, g_ref) + 1e-6


def test_lora_conv_unbatched_and_channels_last():
    x, w, b, a, bb = _args(2, 3, 3, 5, dtype=torch.float32)
    y = fastpeft.lora_conv(x[0], w, b, a, bb, 2.0, padding=1)
    torch.testing.assert_close(y, fastpeft.lora_conv_ref(x[:1], w, b, a, bb, 2.0, padding=1)[0])
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    yc = fastpeft.lora_conv(xc, w, b, a, bb, 2.0, padding=1)
    ref = fastpeft.lora_conv_ref(x, w, b, a, bb, 2.0, padding=1)
    torch.testing.assert_close(yc, ref)
    dy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(yc, (xc, a, bb), dy), torch.autograd.grad(ref, (x, a, bb), dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_lora_conv_keeps_no_dropped_copy_of_x():
    """With dropout, autograd's composition keeps drop(x) (a second x) for A's gradient; the op keeps x and u."""
    x, w, b, a, bb = _args(2, 3, 4, 8, dtype=torch.float32, size=16)
    x = x.detach().requires_grad_()
    w, b = w.detach(), b.detach()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastpeft.lora_conv(x, w, b, a, bb, 2.0, 0.2, True, seed=3, padding=1)
    ours = sum(s for s in sizes if s >= x.numel())
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastpeft.lora_conv_ref(x, w, b, a, bb, 2.0, 0.2, True, 3, padding=1, cpu_stream=True)
    theirs = sum(s for s in sizes if s >= x.numel())
    assert ours == x.numel() and theirs >= 2 * x.numel()


def test_lora_conv_second_derivatives():
    ins = _args(2, 3, 2, 5)
    kw = dict(padding=1)
    outs = []
    for fn in (lambda: fastpeft.lora_conv(*ins, 0.7, 0.2, True, seed=5, **kw),
               lambda: fastpeft.lora_conv_ref(*ins, 0.7, 0.2, True, 5, cpu_stream=True, **kw)):
        y = fn()
        gx, ga = torch.autograd.grad(y.square().sum(), (ins[0], ins[3]), create_graph=True)
        outs.append(torch.autograd.grad((gx.square().sum() + ga.square().sum()), ins[3:]))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- FastLoRAConv and inject against PEFT ------------------------------------------------------------------

class Net(nn.Module):
    """Conv2d (zero padding), Conv2d (stride 2, reflect padding), Conv1d (1-wide), Conv3d, a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv1d(8, 6, 1)
        self.c4 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = self.c2(torch.relu(self.c1(x)))
        h = self.c3(h.flatten(2))
        v = self.c4(h[:, None, :2, :, None].expand(-1, -1, -1, -1, 3))
        return self.fc(h.mean(2)) + v.mean((1, 2, 3, 4))[:, None]


TARGETS = ["c1", "c2", "c3", "c4", "fc"]


def _pair(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = Net()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                      lora_dropout=dropout))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                           lora_dropout=dropout))
    with torch.no_grad():  # non-zero B, the same in both
        for name in TARGETS:
            b = theirs.base_model.model.get_submodule(name).lora_B["default"].weight
            b.normal_()
            ours.get_submodule(name).lora_B.copy_(b)
    return base, theirs, ours


def test_inject_draws_peft_initial_adapters_and_matches_peft_forward_and_gradients():
    torch.manual_seed(0)
    base = Net()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name in TARGETS:
        layer = ours.get_submodule(name)
        assert isinstance(layer, FastLoRAConv) == name.startswith("c")
        torch.testing.assert_close(layer.lora_A, theirs.base_model.model.get_submodule(name).lora_A["default"].weight,
                                   rtol=0, atol=0)
    _, theirs, ours = _pair()
    x = torch.randn(4, 3, 10, 10)
    y_t, y_o = theirs(x), ours(x)
    torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-6)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    for name in TARGETS:
        pl, fl = theirs.base_model.model.get_submodule(name), ours.get_submodule(name)
        _close(fl.lora_A.grad, pl.lora_A["default"].weight.grad)
        _close(fl.lora_B.grad, pl.lora_B["default"].weight.grad)


def test_dropout_in_eval_equals_peft_and_training_steps_follow():
    _, theirs, ours = _pair(dropout=0.1)
    x = torch.randn(3, 3, 10, 10)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    ours.train()
    y1 = ours(x)
    assert not torch.allclose(y1, ours(x))  # a new mask per call
    y1.sum().backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_merge_unmerge_and_merge_and_unload_as_peft():
    _, theirs, ours = _pair()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        before = ours(x)
        theirs.merge_adapter()
        for layer in fastpeft.lora_layers(ours).values():
            layer.merge()
        # reflect padding: the merged kernel pads its LoRA part as the base (PEFT's merge does the same)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        for layer in fastpeft.lora_layers(ours).values():
            layer.unmerge()
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
        merged = fastpeft.merge_and_unload(ours)
        assert type(merged.c1) is nn.Conv2d and type(merged.c4) is nn.Conv3d and merged.c2.padding_mode == "reflect"
        torch.testing.assert_close(merged(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_files_both_ways(tmp_path):
    base, theirs, ours = _pair()
    x = torch.randn(2, 3, 10, 10)
    fastpeft.save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    mine = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert isinstance(mine.c2, FastLoRAConv)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x), rtol=1e-5, atol=1e-6)
        back = fastpeft.to_peft(mine)
        torch.testing.assert_close(back(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_many_adapters_per_batch(tmp_path):
    base, theirs, ours = _pair()
    fastpeft.save_adapter(ours, tmp_path / "a")
    model = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        for layer in fastpeft.lora_layers(model).values():
            layer.lora_B.mul_(-2.0)
    fastpeft.load_adapter(model, tmp_path / "a", adapter_name="b")
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        ya = model(x)
        fastpeft.set_adapter(model, "b")
        yb = model(x)
        with fastpeft.disable_adapter(model):
            y0 = model(x)
        with fastpeft.mixed_batch(model, ["default", "b", "__base__", "b"]):
            ym = model(x)
        ids = torch.tensor([1, 0, -1, 0])
        yi = model.c1(x, adapter_ids=ids)
        want = torch.stack([model.c1(x[i:i + 1], adapter_ids=ids[i:i + 1])[0] for i in range(4)])
    torch.testing.assert_close(ym, torch.stack([ya[0], yb[1], y0[2], yb[3]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yi, want, rtol=1e-5, atol=1e-6)
    ym = None
    with fastpeft.mixed_batch(model, ["b", "b", "default", "b"]):  # training: gradients reach the used adapters only
        model.train()
        model(x).sum().backward()
    assert model.c1.lora_A_adapters["b"].grad is not None or not model.c1.lora_A_adapters["b"].requires_grad


def test_eval_no_grad_calls_see_in_place_updates():
    """No-grad calls fold W + s B A per call (nothing kept between calls): an in-place update is seen at once."""
    torch.manual_seed(0)
    layer = FastLoRAConv(nn.Conv2d(4, 6, 3, padding=1), r=2, init_lora_weights=False).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(x), fastpeft.lora_conv_ref(x, layer.weight, layer.bias, layer.lora_A,
                                                                        layer.lora_B.view(6, 2), layer.scaling,
                                                                        padding=1))
            layer.lora_B.add_(1.0)


def test_all_linear_leaves_convolutions_as_peft():
    model = fastpeft.inject(Net(), LoraConfig(r=2, target_modules="all-linear"))
    assert type(model.c1) is nn.Conv2d and isinstance(model.fc, fastpeft.FastLoRALinear)
    fastpeft.inject(model, LoraConfig(r=2, target_modules="all-linear"), adapter_name="second")
    assert type(model.c1) is nn.Conv2d


def test_fp32_adapters_on_a_bf16_conv_under_autocast_and_compile():
    torch.manual_seed(0)
    layer = FastLoRAConv(nn.Conv2d(4, 6, 3, padding=1), r=2, init_lora_weights=False)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


# ---- fastpeft.accelerate on PEFT's LoRA convolutions -------------------------------------------------------

def test_accelerate_computes_peft_conv_layers_with_peft_outputs_and_gradients(tmp_path):
    torch.manual_seed(0)
    base = Net()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                      lora_dropout=0.1, init_lora_weights=False))
    ours = copy.deepcopy(theirs)
    report = fastpeft.accelerate(ours)
    assert sorted(n.rsplit(".", 1)[-1] for n in report.patched) == ["c1", "c3", "c4", "fc"]
    assert "padding_mode='reflect'" in report.skipped["base_model.model.c2"]
    assert type(ours.base_model.model.c1).__name__ == "AcceleratedConv2d"
    x = torch.randn(3, 3, 10, 10)
    ours.eval()
    theirs.eval()
    with torch.no_grad():  # eval: dropout off, the no-grad (folded) path
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    for m in (ours, theirs):
        for layer in m.modules():
            if isinstance(layer, nn.Dropout):
                layer.p = 0.0
    ours.train()
    theirs.train()
    y_o, y_t = ours(x), theirs(x)
    torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-6)
    y_o.square().sum().backward()
    y_t.square().sum().backward()
    for (name, p_o), p_t in zip(ours.named_parameters(), theirs.parameters()):
        if p_o.requires_grad:
            _close(p_o.grad, p_t.grad)
    assert report.calls()["fastpeft"] == 2 * 4  # two calls (eval, train) of the four patched layers
    with torch.no_grad():  # PEFT's own forward where fastpeft does not compute: merged adapters
        theirs.merge_adapter()
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert report.calls()["merged adapters"] == 4
    ours.unmerge_adapter()
    ours.save_pretrained(tmp_path)  # PEFT's own files, PEFT's own loading
    fastpeft.restore(ours)
    assert type(ours.base_model.model.c1).__name__ == "Conv2d"


def test_accelerate_dropout_trains():
    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, target_modules=["c1", "c3"], lora_dropout=0.3,
                                                       init_lora_weights=False))
    fastpeft.accelerate(model, strict=True)
    x = torch.randn(2, 3, 10, 10)
    y = model(x)
    assert not torch.allclose(y, model(x))  # a mask per call
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("how", ["cat", "linear", "svd", "ties_svd"])
def test_add_weighted_adapter_on_convolutions_as_peft(tmp_path, how):
    """PEFT flattens a convolution's kernels to (r, C·K) / (O, r) for its arithmetic (its SVD types for Conv2d)."""
    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))

    targets = ["c1", "c2", "fc"]
    torch.manual_seed(0)
    base = Small()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets,
                                                                      init_lora_weights=False))
    theirs.add_adapter("b", peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    fastpeft.load_adapter(ours, tmp_path / "b", adapter_name="b")
    kw = dict(density=0.5) if how.startswith("ties") else {}
    torch.manual_seed(3)
    theirs.add_weighted_adapter(["default", "b"], [0.7, 0.4], "w", combination_type=how, **kw)
    torch.manual_seed(3)
    fastpeft.add_weighted_adapter(ours, ["default", "b"], [0.7, 0.4], "w", combination_type=how, **kw)
    theirs.set_adapter("w")
    fastpeft.set_adapter(ours, "w")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        _close(ours(x), theirs(x), 1e-5)


# ---- DoRA on convolutions (PEFT's DoraConv1d / 2d / 3d layers) ---------------------------------------------

DORA_TARGETS = ["c1", "c3", "c4", "fc"]  # (c2 pads by reflection: DoRA refuses it, as PEFT's is half zero-padded)


def _dora_pair(dropout=0.0):
    torch.manual_seed(0)
    base = Net()
    cfg = dict(r=4, lora_alpha=8, target_modules=DORA_TARGETS, use_dora=True, lora_dropout=dropout)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg, init_lora_weights=False))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg, init_lora_weights=False))
    with torch.no_grad():
        for name in DORA_TARGETS:
            pl, fl = theirs.base_model.model.get_submodule(name), ours.get_submodule(name)
            torch.testing.assert_close(fl.magnitude(), pl.lora_magnitude_vector["default"].weight, rtol=0, atol=0)
            pl.lora_magnitude_vector["default"].weight.mul_(torch.rand_like(pl.lora_magnitude_vector["default"].weight)
                                                            + 0.5)
            fl.magnitude().copy_(pl.lora_magnitude_vector["default"].weight)
            fl.lora_B.copy_(pl.lora_B["default"].weight)
    return base, theirs, ours


def test_dora_convolutions_match_peft_forward_gradients_files_and_merge(tmp_path):
    base, theirs, ours = _dora_pair()
    assert ours.c1.magnitude().shape == (1, 8, 1, 1) and ours.c4.magnitude().shape == (1, 2, 1, 1, 1)
    x = torch.randn(3, 3, 10, 10)
    y_t, y_o = theirs(x), ours(x)
    _close(y_o, y_t)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    for name in DORA_TARGETS:
        pl, fl = theirs.base_model.model.get_submodule(name), ours.get_submodule(name)
        _close(fl.lora_A.grad, pl.lora_A["default"].weight.grad)
        _close(fl.lora_B.grad, pl.lora_B["default"].weight.grad)
        _close(fl.magnitude().grad, pl.lora_magnitude_vector["default"].weight.grad)
    theirs.eval()
    ours.eval()
    fastpeft.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = theirs(x)
        _close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")(x), want)
        _close(fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")(x), want)
        for layer in fastpeft.lora_layers(ours).values():
            layer.merge()
        _close(ours(x), want)
        for layer in fastpeft.lora_layers(ours).values():
            layer.unmerge()
        _close(ours(x), want)
        _close(fastpeft.merge_and_unload(ours)(x), want)


def test_dora_conv_dropout_is_peft_training_form():
    """In training with dropout: conv(x, W) + b + (g - 1) conv(drop(x), W) + g s B conv(drop(x), A)."""
    x, w, b, a, bb = _args(2, 3, 3, 5)
    m = torch.rand(5, dtype=torch.float64, requires_grad=True)
    y = fastpeft.dora_conv(x, w, b, a, bb, m, 0.7, 0.3, True, seed=4, padding=1)
    xd = fastpeft.reference.lora_dropout_stream(x, 0.3, 4, cpu=True)
    n = torch.linalg.vector_norm((w + 0.7 * (bb @ a.reshape(4, -1)).view_as(w)).detach().flatten(1), dim=1)
    g = (m / n).view(1, 5, 1, 1)
    conv = torch.nn.functional.conv2d
    want = conv(x, w, b, padding=1) + (g - 1) * conv(xd, w, padding=1) + g * 0.7 * conv(conv(xd, a, padding=1),
                                                                                    bb.view(5, 4, 1, 1))
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for got, exp in zip(torch.autograd.grad(y, (x, a, bb, m), dy), torch.autograd.grad(want, (x, a, bb, m), dy)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # out of training: the fused form, the same as PEFT's eval
        y0 = fastpeft.dora_conv(x, w, b, a, bb, m, 0.7, 0.3, False, padding=1)
        low = conv(conv(x, a, padding=1), bb.view(5, 4, 1, 1))
        torch.testing.assert_close(y0, g * (conv(x, w, padding=1) + 0.7 * low) + b.view(1, 5, 1, 1))


def test_accelerate_computes_peft_dora_convolutions():
    _, theirs, _ = _dora_pair()
    ours = copy.deepcopy(theirs)
    report = fastpeft.accelerate(ours, strict=True)
    assert len(report.patched) == 4
    x = torch.randn(2, 3, 10, 10)
    y_t, y_o = theirs(x), ours(x)
    _close(y_o, y_t)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    for p_o, p_t in zip(ours.parameters(), theirs.parameters()):
        if p_o.requires_grad:
            _close(p_o.grad, p_t.grad)
    assert report.calls() == {"fastpeft": 4}


def test_merge_and_unload_gives_back_the_wrapped_convolution_itself():
    """A subclass with an __init__ of its own (not rebuildable from the geometry) comes back as it was wrapped (a
    shallow copy of it: the layer keeps no reference to its old weight)."""
    class Same(nn.Conv2d):
        def __init__(self, c):
            super().__init__(c, c, 3, padding=1)

    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), Same(4)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = TwoConvs()
    original = model.b
    model = fastpeft.inject(model, LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        merged = fastpeft.merge_and_unload(model)
        assert type(merged.b) is Same and merged.b.weight is original.weight and type(merged.a) is nn.Conv2d
        _close(merged(x), want)


def test_accelerate_leaves_convolutions_computing_their_own_kernel_on_peft():
    """A subclass overriding _conv_forward (weight standardisation) computes something lora_conv does not."""
    class StdConv(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True),
                                         b)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = StdConv(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    model = peft.get_peft_model(One(), peft.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    report = fastpeft.accelerate(model)
    assert "_conv_forward" in report.skipped["base_model.model.conv"]


def test_accelerate_computes_weight_normed_peft_convolutions():
    """The weight of a parametrized convolution is read at each call: gradients reach its original Parameters."""
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3))

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    theirs = peft.get_peft_model(One(), peft.LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    for p in theirs.base_model.model.conv.base_layer.parametrizations.weight.parameters():
        p.requires_grad_(True)
    ours = copy.deepcopy(theirs)
    assert fastpeft.accelerate(ours, strict=True).patched
    x = torch.randn(2, 3, 9)
    y_t, y_o = theirs(x), ours(x)
    _close(y_o, y_t)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    for p_o, p_t in zip(ours.parameters(), theirs.parameters()):
        if p_t.requires_grad:
            _close(p_o.grad, p_t.grad)


def test_all_linear_beside_conv_lora_warns_of_no_fused_experts(recwarn):
    model = fastpeft.inject(Net(), LoraConfig(r=2, target_modules=["c1", "c4"]))
    fastpeft.inject(model, LoraConfig(r=2, target_modules="all-linear"), adapter_name="lin")
    assert not [w for w in recwarn if "fused expert weights" in str(w.message)]


def test_dilated_same_padded_convolution_as_peft(tmp_path):
    """PEFT's lora_A is not dilated; with padding='same' its output keeps the base's shape and PEFT trains it."""
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, dilation=2, padding="same")

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    base = One()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["conv"],
                                                                      init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 3, 7, 7)
    y_t, y_o = theirs(x), ours(x)
    _close(y_o, y_t)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    _close(ours.conv.lora_A.grad, theirs.base_model.model.conv.lora_A["default"].weight.grad)
    with torch.no_grad():
        with fastpeft.mixed_batch(ours, ["default", "__base__"]):
            _close(ours(x)[:1], y_t[:1])
    assert "dilation" in fastpeft.accelerate(copy.deepcopy(theirs)).skipped["base_model.model.conv"]


def test_channels_last_and_conv1d_outputs_keep_their_layout_compiled():
    layer = FastLoRAConv(nn.Conv2d(3, 4, 3, padding=1), r=2, init_lora_weights=False)
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    y = torch.compile(layer, backend="aot_eager")(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, layer(x))
    with torch.no_grad():  # no graph break in the no-grad path either
        torch.compile(layer.eval(), backend="aot_eager", fullgraph=True)(x)


def test_reflect_padded_layer_under_autocast_returns_the_base_dtype_and_numpy_geometry_is_taken():
    import numpy as np

    layer = FastLoRAConv(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), r=2, init_lora_weights=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 3, 6, 6)).dtype == torch.bfloat16  # (PEFT's: the base result's dtype)
    conv = nn.Conv2d(3, 4, 3, stride=np.int64(2), padding=np.int64(1))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(FastLoRAConv(conv, r=2)(x), conv(x))  # B = 0: the base


def test_mixed_batch_leaves_unrouted_adapters_without_gradients_when_traced():
    model = fastpeft.inject(Net(), LoraConfig(r=2, target_modules=["c1", "fc"], init_lora_weights=False))
    fastpeft.inject(model, LoraConfig(r=2, target_modules=["c1", "fc"], init_lora_weights=False), adapter_name="b")
    for name, p in model.named_parameters():
        if "lora" in name:
            p.requires_grad_(True)
    with fastpeft.mixed_batch(model, ["default", "default"]):
        torch.compile(model, backend="aot_eager")(torch.randn(2, 3, 10, 10)).sum().backward()
    assert model.c1.lora_A_adapters["b"].grad is None and model.c1.lora_A_adapters["default"].grad is not None


def test_accelerate_computes_several_active_peft_conv_adapters():
    """Several active adapters (diffusers' set_adapters; PEFT's set_adapter with a list): their kernels side by side,
    each B scaled by its adapter's scaling, one lora_conv call."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c1", "c3", "fc"],
                                                        init_lora_weights=False))
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c1", "c3", "fc"],
                                            init_lora_weights=False))
    theirs.base_model.set_adapter(["default", "b"])
    ours = copy.deepcopy(theirs)
    report = fastpeft.accelerate(ours)
    x = torch.randn(2, 3, 10, 10)
    y_t, y_o = theirs(x), ours(x)
    _close(y_o, y_t)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    for (name, p_o), p_t in zip(ours.named_parameters(), theirs.parameters()):
        if p_t.requires_grad:
            _close(p_o.grad, p_t.grad)
    assert report.calls() == {"fastpeft": 3}


def test_unbatched_input_with_dropout_compiles():
    """The unbatched call goes round by the batched one before the seed is drawn (a drawn seed is a tensor while
    compiling, which the argument check refused)."""
    w, a, b = torch.randn(4, 3, 3, 3), torch.randn(2, 3, 3, 3), torch.randn(4, 2)
    f = torch.compile(lambda x: fastpeft.lora_conv(x, w, None, a, b, 1.0, dropout_p=0.1, padding=1),
                      backend="aot_eager", fullgraph=True)
    assert f(torch.randn(3, 6, 6)).shape == (4, 6, 6)


@pytest.mark.gpu
def test_lora_conv_on_a_card_dropout_mask_and_deterministic_mode():
    """On CUDA an int seed draws the mask from torch's generator (one kernel); the oracle draws the same one, and in
    deterministic mode two backward passes give the same bits (cuDNN pinned to its deterministic algorithms)."""
    dev = "cuda"
    ins = tuple(t.to(dev).detach().requires_grad_() for t in _args(2, 3, 8, 64, dtype=torch.float32, size=32))
    y = fastpeft.lora_conv(*ins, 0.5, 0.2, True, seed=7, padding=1)
    ref = fastpeft.lora_conv_ref(*ins, 0.5, 0.2, True, 7, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, ins, dy), torch.autograd.grad(ref, ins, dy)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    with fastpeft.deterministic():
        runs = [torch.autograd.grad(fastpeft.lora_conv(*ins, 0.5, 0.2, True, seed=7, padding=1), ins, dy)
                for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(*runs))
