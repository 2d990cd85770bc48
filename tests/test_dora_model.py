"""DoRA in the user-facing API: ``FastLoRALinear(use_dora=True)``, ``LoraConfig(use_dora=True)`` through
inject, PEFT's files both ways (outputs and gradients, fp32), merge / unmerge / merge_and_unload against
PEFT's, and the combinations fastpeft refuses.

Adapters are built with ``init_lora_weights=False`` (non-zero B) and the magnitudes are perturbed away from
``‖W + sBA‖``, so a dropped or misnamed magnitude changes the outputs (g = 1 otherwise).
"""
import json
import os

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import fastpeft  # noqa: E402
from conftest import assert_close_report  # noqa: E402
from fastpeft.reference import dora_linear_ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RTOL, ATOL = 1e-5, 1e-5  # fp32: the same math in another order; a lost magnitude is off by ~1e-1
TARGETS = ["q_proj", "v_proj", "mlp.0", "mlp.2"]


class Tiny(nn.Module):
    def __init__(self, d=20, hidden=36):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = x + torch.tanh(self.q_proj(x)) * self.v_proj(x)
        return self.head(h + self.mlp(h))


def _base(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def _x(seed=1):
    return torch.randn(4, 7, 20, generator=torch.Generator().manual_seed(seed))


def _perturb_magnitudes(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _peft_model(seed=0, **kw):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False, **kw)
    torch.manual_seed(seed + 10)
    model = peft.get_peft_model(_base(seed), cfg)
    _perturb_magnitudes(model)
    return model


def _fast_model(seed=0, **kw):
    model = _base(seed)
    torch.manual_seed(seed + 20)
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                               init_lora_weights=False, **kw))
    _perturb_magnitudes(model, seed=3)
    return model


def _grads(model, x, dy):
    """Output and the gradients of every trainable parameter, by the module path of its layer and kind."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(dy)
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".default", "").replace("_adapters", "")
            key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector").replace(".weight", "")
            out[key] = p.grad
    return y.detach(), out


# ---------------------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", [True, False], ids=["B0", "Brandom"])
def test_layer_magnitude_init_and_forward(init):
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(48, 33, r=8, lora_alpha=16, use_dora=True, init_lora_weights=init)
    m = layer.magnitude()
    want = torch.linalg.vector_norm(layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    assert_close_report(m.detach(), want, 1e-6, 1e-6, "m")
    if init:  # B = 0: m = ‖W‖ and the layer starts as its base
        assert_close_report(m.detach(), torch.linalg.vector_norm(layer.weight, dim=1), 1e-6, 1e-6, "m=|W|")
    x = torch.randn(5, 3, 48)
    with torch.no_grad():
        m.mul_(torch.linspace(0.5, 1.5, 33))
    y = layer(x)
    ref = dora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, m, layer.scaling)
    assert_close_report(y, ref, 1e-5, 1e-6, "y")
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A_adapters.default", "lora_B_adapters.default", "lora_magnitude_vector.default"}


def test_layer_weight_norm_cache_follows_weight():
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(16, 12, r=4, use_dora=True, init_lora_weights=False)
    x = torch.randn(3, 16)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place write bumps the version: the cached ‖W‖² is recomputed
    ref = dora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude(), layer.scaling)
    assert_close_report(layer(x), ref, 1e-5, 1e-6, "y after W changed")


def test_layer_merge_unmerge_to_linear():
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(40, 24, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        layer.magnitude().mul_(torch.linspace(0.7, 1.3, 24))
    x = torch.randn(6, 40)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        lin = layer.to_linear()
        assert_close_report(lin(x), y, 1e-5, 1e-5, "to_linear")
        layer.merge()
        assert_close_report(layer(x), y, 1e-5, 1e-5, "merged")
        layer.unmerge()
    assert_close_report(layer.weight, w0, 1e-6, 1e-6, "unmerged W")
    assert_close_report(layer(x).detach(), y, 1e-5, 1e-5, "after unmerge")


def test_layer_add_adapter_dora_beside_lora():
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(16, 12, r=4, init_lora_weights=False)
    layer.add_adapter("d", 2, 4, use_dora=True, init_lora_weights=False)
    assert not layer.is_dora("default") and layer.is_dora("d") and layer.magnitude("default") is None
    layer.set_adapter("d")
    assert layer.magnitude().requires_grad and not layer.lora_A_adapters["default"].requires_grad
    x = torch.randn(3, 16)
    ref = dora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude(), layer.scaling)
    assert_close_report(layer(x), ref, 1e-5, 1e-6, "y")
    layer.set_adapter("default")
    assert not layer.magnitude("d").requires_grad
    layer.delete_adapter("d")
    assert "d" not in layer.lora_magnitude_vector


# ---------------------------------------------------------------------------------------------------------
# PEFT's files, both ways
# ---------------------------------------------------------------------------------------------------------

def test_peft_dora_loads_with_same_outputs_and_gradients(tmp_path):
    ref = _peft_model()
    ref.save_pretrained(tmp_path)
    ours = fastpeft.load_adapter(_base(), tmp_path)
    x, dy = _x(), torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(5))
    ref.train()
    ours.train()
    y_ref, g_ref = _grads(ref, x, dy)
    y, g = _grads(ours, x, dy)
    assert_close_report(y, y_ref, RTOL, ATOL, "y")
    assert set(g) == set(g_ref) and any("lora_magnitude_vector" in k for k in g)
    for k in g_ref:
        assert_close_report(g[k], g_ref[k], RTOL, ATOL, f"d {k}")
    assert fastpeft.trainable_parameters(ours)[0] == ref.get_nb_trainable_parameters()[0]


def test_ours_loads_in_peft_with_same_outputs(tmp_path):
    ours = _fast_model()
    fastpeft.save_adapter(ours, tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        assert json.load(f)["use_dora"] is True
    ref = peft.PeftModel.from_pretrained(_base(), tmp_path)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        assert_close_report(ours(_x()), ref(_x()), RTOL, ATOL, "y")
    saved = safetensors_torch.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    peft_keys = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(ref).items()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == peft_keys


@pytest.mark.parametrize("how", ["merge_and_unload", "merge-unmerge"])
def test_merge_matches_peft(tmp_path, how):
    ref = _peft_model()
    ref.save_pretrained(tmp_path)
    ours = fastpeft.load_adapter(_base(), tmp_path)
    ours.eval()
    ref.eval()
    x = _x()
    with torch.no_grad():
        y = ours(x)
        if how == "merge_and_unload":
            merged_ref = ref.merge_and_unload()
            merged = fastpeft.merge_and_unload(ours)
            for name in TARGETS:
                assert type(merged.get_submodule(name)) is nn.Linear
                assert_close_report(merged.get_submodule(name).weight, merged_ref.get_submodule(name).weight,
                                    1e-6, 1e-6, f"merged W of {name}")
            assert_close_report(merged(x), y, RTOL, ATOL, "y merged")
        else:
            layers = fastpeft.lora_layers(ours)
            w0 = {n: m.weight.clone() for n, m in layers.items()}
            for m in layers.values():
                m.merge()
            ref.merge_adapter()
            for n, m in layers.items():
                assert_close_report(m.weight, ref.base_model.model.get_submodule(n).base_layer.weight, 1e-6, 1e-6,
                                    f"merged W of {n}")
            assert_close_report(ours(x), y, RTOL, ATOL, "y merged")
            for m in layers.values():
                m.unmerge()
            for n, m in layers.items():
                assert_close_report(m.weight, w0[n], 1e-6, 1e-6, f"unmerged W of {n}")
            assert_close_report(ours(x), y, RTOL, ATOL, "y unmerged")


# ---------------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------------

def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def _assert_load_refused(model, path, match):
    """load_adapter(model, path) raises a ValueError matching ``match`` and leaves the model's state as it was."""
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        fastpeft.load_adapter(model, path)
    assert _same(model, before)


def test_dora_file_without_magnitudes_refused(tmp_path):
    _peft_model().save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    w = safetensors_torch.load_file(path)
    safetensors_torch.save_file({k: v for k, v in w.items() if "magnitude" not in k}, path)
    model = _base()
    _assert_load_refused(model, tmp_path, "use_dora=true but the file holds no 'lora_magnitude_vector'")
    assert not fastpeft.lora_layers(model)


def test_magnitudes_in_plain_lora_config_refused(tmp_path):
    _peft_model().save_pretrained(tmp_path)
    cfg_path = os.path.join(tmp_path, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["use_dora"] = False
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    model = _base()
    _assert_load_refused(model, tmp_path, "holds DoRA magnitudes .* use_dora=false")
    assert not fastpeft.lora_layers(model)


def test_dora_file_over_plain_lora_adapter_refused(tmp_path):
    _peft_model().save_pretrained(tmp_path)
    model = _base()
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _assert_load_refused(model, tmp_path, "use_dora=True, the model's adapter 'default' has use_dora=False")


def test_routing_dora_adapters_refused():
    model = _fast_model()
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=TARGETS), adapter_name="plain")
    with pytest.raises(ValueError, match="mixed_batch cannot route DoRA adapters"):
        with fastpeft.mixed_batch(model, ["default", "plain", None, "plain"]):
            pass
    layer = model.q_proj
    with pytest.raises(ValueError, match="DoRA adapters .* cannot be routed per row"):
        layer(torch.randn(2, 20), adapter_ids=torch.tensor([0, 1]))


@pytest.mark.parametrize("other", ["dora", "rosa"])
def test_mixed_batch_routes_plain_adapters_beside_an_unrouted_dora_or_rosa_one(other):
    """A model that merely holds a DoRA (or RoSA) adapter routes its plain LoRA adapters per sequence, as PEFT's
    adapter_names does: only routing that adapter itself is refused."""
    model = _base()
    kind = dict(use_dora=True) if other == "dora" else dict(sparse_density=0.1)
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False, **kind),
                    adapter_name="other")
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                    adapter_name="plain", activate=False)
    x = torch.randn(3, 5, 20)
    with torch.no_grad(), fastpeft.mixed_batch(model, ["plain", None, "plain"]):
        got = model(x)
    fastpeft.set_adapter(model, "plain")
    with torch.no_grad():
        want_plain = model(x)
    fastpeft.set_adapter(model, None)
    with torch.no_grad():
        want_base = model(x)
    torch.testing.assert_close(got[[0, 2]], want_plain[[0, 2]])
    torch.testing.assert_close(got[1], want_base[1])
    with pytest.raises(ValueError, match="cannot route .*\\['other'\\]"):
        with fastpeft.mixed_batch(model, ["plain", "other", None]):
            pass


def test_dora_with_rosa_refused():
    with pytest.raises(ValueError, match="use_dora=True with sparse_density=0.1"):
        fastpeft.LoraConfig(use_dora=True, sparse_density=0.1)
    with pytest.raises(ValueError, match="use_dora=True with sparse_density=0.1"):
        fastpeft.FastLoRALinear(8, 8, use_dora=True, sparse_density=0.1)
    layer = fastpeft.FastLoRALinear(8, 8)
    with pytest.raises(ValueError, match="use_dora=True with sparse_density"):
        layer.add_adapter("x", 2, 2, use_dora=True, sparse_density=0.5)
    assert layer.adapter_names == ["default"]


def test_dora_on_a_quantized_layer_builds_its_magnitude_from_the_dequantized_weight():
    """QDoRA at the layer: from_linear(Linear4bit, use_dora=True) gives a QLoRALinear whose magnitude is the row
    norms of deq(W) (B = 0), fp32 (before 2026-12-01 refused)."""
    from fastpeft.quant import import_bitsandbytes

    try:
        bnb = import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed")
    lin = nn.Linear(64, 32)
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu")
    q = fastpeft.FastLoRALinear.from_linear(layer, use_dora=True)
    assert type(q).__name__ == "QLoRALinear" and q.is_dora()
    m = q.magnitude("default")
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, torch.linalg.vector_norm(q._dense(), dim=1), rtol=0, atol=0)


def test_to_peft_keeps_dora():
    ours = _fast_model().eval()
    x = _x()
    with torch.no_grad():
        y = ours(x)
        ref = fastpeft.to_peft(ours).eval()
        assert ref.peft_config["default"].use_dora
        assert_close_report(ref(x), y, RTOL, ATOL, "y of to_peft")


def test_layer_on_triton_backend_matches_reference():
    """The layer through functional.dora_linear on the kernels (TRITON_INTERPRET=1 on CPU) vs the reference."""
    from fastpeft import kernels

    if not kernels.HAS_TRITON or not (kernels.INTERPRET or torch.cuda.is_available()):
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(80, 48, r=8, lora_alpha=16, use_dora=True, init_lora_weights=False, device=dev)
    with torch.no_grad():
        layer.magnitude().mul_(torch.linspace(0.6, 1.4, 48, device=dev))
    x = torch.randn(3, 11, 80, device=dev)
    out = {}
    for backend in ("reference", "triton"):
        layer.zero_grad(set_to_none=True)
        with fastpeft.use_backend(backend):
            y = layer(x)
        y.backward(torch.ones_like(y))
        out[backend] = [y.detach(), layer.lora_A.grad, layer.lora_B.grad, layer.magnitude().grad]
    for name, a, e in zip(("y", "dA", "dB", "dm"), out["triton"], out["reference"]):
        assert_close_report(a, e, 1e-4, 1e-5, name)
