"""PEFT's ``lora_bias=True`` (a trained bias b_B on B: the update ``s (B A x + b_B)``) on fastpeft's own layers:
``inject`` draws PEFT's initial adapters (the bias too), outputs and every gradient equal PEFT's on linear and
convolution layers, files load both ways, merge / unmerge / merge_and_unload / to_peft, many adapters per batch, and
what PEFT refuses (or fastpeft does not compute) is refused before the model changes."""
import copy

import pytest
import torch
import torch.nn as nn

import fastpeft
from conftest import assert_close_to_largest as _close
from fastpeft import LoraConfig

peft = pytest.importorskip("peft")

TARGETS = ["c1", "fc", "out"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)
        self.out = nn.Linear(6, 5)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.c1(x)).mean((2, 3)))))


def _pair(init=True, dropout=0.0):
    torch.manual_seed(0)
    base = Net()
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True, init_lora_weights=init, lora_dropout=dropout)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg))
    return base, theirs, ours


@pytest.mark.parametrize("init", [True, False])
def test_initial_adapters_are_peft_draws(init):
    _, theirs, ours = _pair(init)
    for name in TARGETS:
        pl, fl = theirs.base_model.model.get_submodule(name), ours.get_submodule(name)
        for got, want in ((fl.lora_A, pl.lora_A["default"].weight), (fl.lora_B, pl.lora_B["default"].weight),
                          (fl.lora_bias_adapters["default"], pl.lora_B["default"].bias)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fastpeft.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def _randomised(theirs, ours):
    with torch.no_grad():
        for name in TARGETS:
            pl, fl = theirs.base_model.model.get_submodule(name), ours.get_submodule(name)
            pl.lora_B["default"].weight.normal_()
            pl.lora_B["default"].bias.normal_()
            fl.lora_B.copy_(pl.lora_B["default"].weight)
            fl.lora_bias_adapters["default"].copy_(pl.lora_B["default"].bias)


def test_outputs_and_every_gradient_equal_peft():
    _, theirs, ours = _pair()
    _randomised(theirs, ours)
    x = torch.randn(3, 3, 6, 6)
    y_t, y_o = theirs(x), ours(x)
    _close(y_o, y_t)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    for name in TARGETS:
        pl, fl = theirs.base_model.model.get_submodule(name), ours.get_submodule(name)
        _close(fl.lora_bias_adapters["default"].grad, pl.lora_B["default"].bias.grad)
        _close(fl.lora_A.grad, pl.lora_A["default"].weight.grad)
        _close(fl.lora_B.grad, pl.lora_B["default"].weight.grad)


def test_files_merges_and_many_adapters(tmp_path):
    base, theirs, ours = _pair()
    _randomised(theirs, ours)
    x = torch.randn(3, 3, 6, 6)
    fastpeft.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = theirs(x)
        _close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")(x), want)
        loaded = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
        _close(loaded(x), want)
        bias_before = loaded.fc.bias.clone()
        for layer in fastpeft.lora_layers(loaded).values():
            layer.merge()
        assert not torch.equal(loaded.fc.bias, bias_before)
        _close(loaded(x), want)
        for layer in fastpeft.lora_layers(loaded).values():
            layer.unmerge()
        _close(loaded.fc.bias, bias_before, 1e-6)
        fastpeft.load_adapter(loaded, tmp_path / "ours", adapter_name="b")
        with fastpeft.disable_adapter(loaded):
            base_out = loaded(x)
        with fastpeft.mixed_batch(loaded, ["default", "__base__", "b"]):
            mixed = loaded(x)
        _close(mixed, torch.stack([want[0], base_out[1], want[2]]))
        _close(fastpeft.to_peft(loaded)(x), want)
        _close(fastpeft.merge_and_unload(loaded)(x), want)
    mixed_train = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    fastpeft.load_adapter(mixed_train, tmp_path / "ours", adapter_name="b")
    for n, p in mixed_train.named_parameters():
        if "lora" in n:
            p.requires_grad_(True)
    with fastpeft.mixed_batch(mixed_train, ["default", "default", "__base__"]):
        mixed_train(x).sum().backward()
    assert mixed_train.fc.lora_bias_adapters["default"].grad is not None
    assert mixed_train.fc.lora_bias_adapters["b"].grad is None  # (unused in the batch: no gradient, as PEFT)


def test_merge_without_a_base_bias_is_refused_as_peft():
    layer = fastpeft.FastLoRALinear(4, 3, r=2, bias=False, lora_bias=True)
    with pytest.raises(RuntimeError, match="lora_bias=True but the base layer has no bias"):
        layer.merge()
    assert not layer.merged
    with pytest.raises(RuntimeError, match="no bias"):
        layer.to_linear()


def test_bf16_model_keeps_fp32_lora_biases_as_peft(tmp_path):
    """PEFT's autocast_adapter_dtype upcasts all of lora_B, its bias included."""
    torch.manual_seed(0)
    base = Net().to(torch.bfloat16)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True, init_lora_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg))
    assert ours.fc.lora_bias_adapters["default"].dtype == torch.float32
    assert theirs.base_model.model.fc.lora_B["default"].bias.dtype == torch.float32
    theirs.save_pretrained(tmp_path)
    loaded = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded.fc.lora_bias_adapters["default"], theirs.base_model.model.fc.lora_B[
        "default"].bias, rtol=0, atol=0)


def test_loading_over_an_adapter_of_the_other_lora_bias_is_refused_unchanged(tmp_path):
    _, theirs, _ = _pair()
    theirs.save_pretrained(tmp_path / "with")
    torch.manual_seed(0)
    plain = fastpeft.inject(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="lora_bias=True, the model's adapter 'default' has lora_bias=False"):
        fastpeft.load_adapter(plain, tmp_path / "with")
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())


def test_merge_and_unload_refuses_before_any_change_where_a_base_has_no_bias():
    class TwoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.out(self.fc(x))

    with pytest.warns(UserWarning, match="merging it won't be possible"):
        model = fastpeft.inject(TwoLinears(), LoraConfig(r=2, target_modules=["fc", "out"], lora_bias=True))
    with pytest.raises(RuntimeError, match="'out'.*nothing was changed"):
        fastpeft.merge_and_unload(model)
    assert isinstance(model.fc, fastpeft.FastLoRALinear) and not model.fc.merged


def test_fp64_layers_sum_the_lora_bias_in_fp64():
    layer = fastpeft.FastLoRALinear(4, 3, r=2, lora_bias=True, init_lora_weights=False, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    want = x @ layer.weight.t() + layer.bias + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t()
                                                                + layer.lora_bias_adapters["default"])
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
