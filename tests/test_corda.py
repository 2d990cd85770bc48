"""PEFT's CorDA in fastpeft: ``preprocess_corda`` (PEFT's own, on the layers ``inject`` will adapt) then ``inject`` with
``init_lora_weights="corda"`` give PEFT's factors and residual base weights bit for bit ("ipm" and "kpm"); the model
starts as its base; a trained CorDA adapter converts to plain LoRA on the original weights and loads onto its
residual model, and what cannot be done is refused before the model changes."""
import copy
import json
import warnings

import pytest
import torch

import fastpeft
from fastpeft import LoraConfig
from fastpeft.inject import adapter_configs

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("attr")  # (PEFT's CorDA module imports attrs without declaring it)
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
DATA = [torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(8)]


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _runner(model):
    def run():
        for ids in DATA:
            model(ids)
    return run


def _ours(base, **kw):
    model = copy.deepcopy(base)
    config = LoraConfig(**kw)
    fastpeft.preprocess_corda(model, config, run_model=_runner(model))
    torch.manual_seed(1)
    return fastpeft.inject(model, config)


def _config(method="ipm", **kw):
    return dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                corda_config={"corda_method": method}, **kw)


@pytest.mark.parametrize("method,targets", [("ipm", TARGETS), ("kpm", TARGETS), ("ipm", "all-linear")],
                         ids=["ipm", "kpm", "ipm-all-linear"])
def test_factors_and_residual_are_peft_bits_and_the_model_starts_as_its_base(method, targets):
    base = _llama()
    theirs = copy.deepcopy(base)
    cfg = dict(_config(method), target_modules=targets)
    peft_cfg = dict(cfg, corda_config=CordaConfig(corda_method=method))
    if targets == "all-linear":  # (PEFT's preprocess matches the names it is given: all-linear's, resolved)
        peft_cfg["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_preprocess(theirs, peft.LoraConfig(**peft_cfg), run_model=_runner(theirs))
        torch.manual_seed(1)
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(**peft_cfg))
        theirs_next = torch.rand(3)
        ours = _ours(base, **cfg)
    assert torch.equal(torch.rand(3), theirs_next)  # PEFT's draws (its nn.Linear inits), then none
    layers = fastpeft.lora_layers(ours)
    assert len(layers) == (14 if targets == "all-linear" else 6)
    for name, fl in layers.items():
        pl = theirs.base_model.model.get_submodule(name)
        for mine, peft_s in ((fl.lora_A, pl.lora_A["default"].weight), (fl.lora_B, pl.lora_B["default"].weight),
                             (fl.weight, pl.base_layer.weight)):
            torch.testing.assert_close(mine, peft_s, rtol=0, atol=0)
        assert not hasattr(base.get_submodule(name), "eigens")
    with torch.no_grad():
        want = base(DATA[0]).logits
        torch.testing.assert_close(ours(DATA[0]).logits, want, rtol=1e-5, atol=1e-5)  # W - s B A + s B A = W
        torch.testing.assert_close(ours(DATA[0]).logits, theirs(DATA[0]).logits, rtol=0, atol=0)


def test_a_trained_adapter_converts_to_plain_lora_and_loads_onto_its_residual(tmp_path):
    base = _llama()
    model = _ours(base, **_config())
    fastpeft.save_adapter(model, tmp_path / "init")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        want = model(DATA[0]).logits
    fastpeft.save_adapter(model, tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "adapter_config.json").read_text())["corda_config"]["corda_method"] \
        == "ipm"
    fastpeft.save_adapter(model, tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "lora")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(DATA[0]).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(DATA[0]).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="CorDA eigens.*path_initial_model_for_weight_conversion.*residual=True"):
        fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "trained")  # the original W, no eigens: refused
    residual = fastpeft.unload(copy.deepcopy(model))
    again = fastpeft.load_adapter(residual, tmp_path / "trained", residual=True)
    assert adapter_configs(again)["default"].init_lora_weights is True
    with torch.no_grad():
        torch.testing.assert_close(again(DATA[0]).logits, want, rtol=0, atol=0)


def test_a_namesake_layer_keeps_its_own_rank_and_the_config_stays_kpm(tmp_path):
    """A layer whose name ends another's (``mlp.fc`` and ``blocks.0.mlp.fc``) gets its own rank from preprocess_corda
    (PEFT's pattern keys match a name's end); the adapter's corda_config survives residual=True loads, reloads and
    add_weighted_adapter without PEFT's "ignored" / "default" warnings."""
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.fc = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([nn.Module()])
            self.blocks[0].mlp = nn.Module()
            self.blocks[0].mlp.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.blocks[0].mlp.fc(self.mlp.fc(x))

    torch.manual_seed(0)
    base = Net()
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["fc"], rank_pattern={"blocks.0.mlp.fc": 2},
                     init_lora_weights="corda", corda_config={"corda_method": "kpm"})
    model = copy.deepcopy(base)
    fastpeft.preprocess_corda(model, cfg, run_model=lambda: [model(torch.randn(16, 8)) for _ in range(3)])
    assert model.blocks[0].mlp.fc.eigens.S_WC.shape == (2,) and model.mlp.fc.eigens.S_WC.shape == (4,)
    model = fastpeft.inject(model, cfg)
    fastpeft.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*corda_config")
        again = fastpeft.load_adapter(fastpeft.unload(copy.deepcopy(model)), tmp_path, residual=True)
        fastpeft.load_adapter(model, tmp_path)  # into the model's own adapter: its init and config stay
        fastpeft.add_weighted_adapter(model, ["default"], [1.0], "w", combination_type="cat")
    assert adapter_configs(again)["default"].init_lora_weights is True
    for name in ("default", "w"):
        config = adapter_configs(model)[name]
        assert config.init_lora_weights == "corda" and config.corda_config["corda_method"] == "kpm", name


def test_a_failed_pass_leaves_the_layers_as_they_were_and_adapted_layers_are_refused():
    base = _llama()
    model = copy.deepcopy(base)
    cfg = LoraConfig(**_config())
    model.train()
    with pytest.raises(ValueError, match="run_model must feed the model one sequence a call"):
        fastpeft.preprocess_corda(model, cfg, run_model=lambda: model(torch.cat(DATA[:2])))
    assert model.training
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        assert not layer._forward_hooks and not hasattr(layer, "eigens") and not hasattr(layer, "sample_count")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(DATA[0]).logits, base(DATA[0]).logits, rtol=0, atol=0)
    fastpeft.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"q_proj.*hold fastpeft adapters already.*inject the CorDA adapter first"):
        fastpeft.preprocess_corda(model, cfg, run_model=_runner(model))
