"""PEFT's EVA in fastpeft: ``inject`` with ``init_lora_weights="eva"`` draws PEFT's initial adapters, and
``initialize_lora_eva_weights`` sets A from the layers' input SVD with PEFT's rank redistribution: the same factors,
ranks, alphas, patterns and random stream as PEFT's ``initialize_lora_eva_weights`` on the same model and batches;
the files go both ways."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import LoraConfig
from fastpeft.inject import adapter_configs

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(n=6, pad=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 16, dtype=torch.long)
        if pad:
            mask[0, 11:] = 0  # (PEFT's default input preparation leaves padded tokens out of the SVD)
        out.append({"input_ids": torch.randint(0, 64, (4, 16), generator=g), "attention_mask": mask})
    return out


def _pair(base, **kw):
    cfg = {**dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva"), **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
        torch.manual_seed(1)
        ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg))
    return theirs, ours


def _assert_layers_equal(theirs, ours):
    layers = fastpeft.lora_layers(ours)
    peft_layers = {n[len("base_model.model."):]: m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(layers) == sorted(peft_layers)
    for name, fl in layers.items():
        pl = peft_layers[name]
        assert (fl.r, fl.scaling) == (pl.r["default"], pl.scaling["default"]), name
        torch.testing.assert_close(fl.lora_A, pl.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(fl.lora_B, pl.lora_B["default"].weight, rtol=0, atol=0)


EVA_CONFIGS = [dict(rho=2.0), dict(rho=1.0, whiten=True), dict(rho=3.0, adjust_scaling_factors=False)]


@pytest.mark.parametrize("eva", EVA_CONFIGS, ids=["rho2", "rho1-whiten", "rho3-fixed-alpha"])
def test_initialize_gives_peft_s_factors_ranks_patterns_and_random_stream(eva):
    base = _llama()
    theirs, ours = _pair(base, eva_config=peft.EvaConfig(**eva))
    _assert_layers_equal(theirs, ours)  # made: PEFT's draws, B zero
    batches = _batches(pad=True)
    torch.manual_seed(2)
    peft_initialize(theirs, batches, show_progress_bar=False)
    theirs_next = torch.rand(3)
    torch.manual_seed(2)
    assert fastpeft.initialize_lora_eva_weights(ours, batches, show_progress_bar=False) is ours
    assert torch.equal(torch.rand(3), theirs_next)  # the resized adapters' draws: PEFT's, in PEFT's order
    _assert_layers_equal(theirs, ours)
    mine, peft_s = adapter_configs(ours)["default"], theirs.peft_config["default"]
    assert mine.rank_pattern == peft_s.rank_pattern and mine.alpha_pattern == peft_s.alpha_pattern
    ranks = {m.r for m in fastpeft.lora_layers(ours).values()}
    assert (ranks == {4}) == (eva["rho"] == 1.0), ranks  # rho > 1: the budget moved between layers
    with torch.no_grad():
        ids = batches[0]["input_ids"]
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)  # B = 0: the base model


def test_a_layer_without_a_share_loses_its_adapter_as_in_peft():
    base = _llama()
    theirs, ours = _pair(base, eva_config=peft.EvaConfig())
    esd = fastpeft.get_eva_state_dict(ours, _batches(), show_progress_bar=False)
    esd["model.layers.1.mlp.down_proj"] = esd["model.layers.1.mlp.down_proj"][:0]
    esd["model.layers.0.self_attn.q_proj"] = esd["model.layers.0.self_attn.q_proj"][:6]
    torch.manual_seed(3)
    peft_initialize(theirs, eva_state_dict={f"base_model.model.{k}": v.clone() for k, v in esd.items()},
                    show_progress_bar=False)
    torch.manual_seed(3)
    fastpeft.initialize_lora_eva_weights(ours, eva_state_dict=esd, show_progress_bar=False)
    down = ours.model.layers[1].mlp.down_proj
    assert type(down) is nn.Linear and torch.equal(down.weight, base.model.layers[1].mlp.down_proj.weight)
    _assert_layers_equal(theirs, ours)
    config = adapter_configs(ours)["default"]
    assert "model.layers.1.mlp.down_proj" not in config.target_modules
    assert config.rank_pattern == theirs.peft_config["default"].rank_pattern


def test_files_go_both_ways_with_peft(tmp_path):
    base = _llama()
    theirs, ours = _pair(base, eva_config=peft.EvaConfig())
    batches = _batches()
    peft_initialize(theirs, batches, show_progress_bar=False)
    fastpeft.initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    with torch.no_grad():  # trained-looking: B moved (the same in both)
        for m in (theirs, ours):
            g = torch.Generator().manual_seed(4)
            for p in [p for n, p in m.named_parameters() if "lora_B" in n]:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        want = ours(ids).logits
    fastpeft.save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == 2.0
    assert saved["rank_pattern"] == theirs.peft_config["default"].rank_pattern
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = theirs(ids).logits
        from_peft = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
        torch.testing.assert_close(from_peft(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert adapter_configs(from_peft)["default"].init_lora_weights == "eva"


def test_on_a_4bit_model_as_peft(tmp_path):
    """EVA over bitsandbytes NF4 layers (QLoRA): the inputs are the same, so are the factors and ranks."""
    from fastpeft.quant import import_bitsandbytes
    try:
        import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    q4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32)
    kw = dict(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=peft.EvaConfig())
    models = []
    for make in (lambda m: peft.get_peft_model(m, peft.LoraConfig(**kw)),
                 lambda m: fastpeft.inject(m, LoraConfig(**kw))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(1)
            models.append(make(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q4,
                                                                                 device_map="cpu")))
    theirs, ours = models
    batches = _batches()
    peft_initialize(theirs, batches, show_progress_bar=False)
    fastpeft.initialize_lora_eva_weights(ours, batches, show_progress_bar=False)
    assert isinstance(fastpeft.lora_layers(ours)["model.layers.0.self_attn.q_proj"], fastpeft.QLoRALinear)
    _assert_layers_equal(theirs, ours)


def test_embeddings_a_nested_namesake_and_alpha_rounding_as_in_peft():
    """An embedding target takes PEFT's draws and then init_lora_weights=True (EVA takes linear layers; PEFT's warns);
    a layer's name that is the end of another module's (``fc`` and ``block.fc``) hooks that layer only; alpha after a
    rank change rounds as PEFT's (alpha * (k / r): r = 7, alpha = 12)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.fc = nn.Linear(16, 16)
            self.block = nn.Module()
            self.block.fc, self.block.q = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, input_ids, attention_mask=None):
            return self.block.q(self.block.fc(self.fc(self.emb(input_ids))))

    torch.manual_seed(0)
    base = Net()
    theirs, ours = _pair(base, r=7, lora_alpha=12, target_modules=["emb", "fc", "q"], exclude_modules=["block.fc"],
                         eva_config=peft.EvaConfig(rho=2.0))
    batches = [{"input_ids": torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2)
        peft_initialize(theirs, batches, show_progress_bar=False, prepare_model_inputs_fn=None,
                        prepare_layer_inputs_fn=None)
        theirs_next = torch.rand(3)
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match=r"\['emb'\].*not embeddings.*init_lora_weights=True"):
        fastpeft.initialize_lora_eva_weights(ours, batches, show_progress_bar=False, prepare_model_inputs_fn=None,
                                             prepare_layer_inputs_fn=None)
    assert torch.equal(torch.rand(3), theirs_next)
    assert sorted(fastpeft.lora_layers(ours)) == ["block.q", "emb", "fc"]
    for name, fl in fastpeft.lora_layers(ours).items():
        pl = theirs.base_model.model.get_submodule(name)
        assert (fl.r, fl.scaling) == (pl.r["default"], pl.scaling["default"]), name
        a, b = ((pl.lora_embedding_A["default"], pl.lora_embedding_B["default"]) if name == "emb" else
                (pl.lora_A["default"].weight, pl.lora_B["default"].weight))
        torch.testing.assert_close(fl.lora_A, a, rtol=0, atol=0)
        torch.testing.assert_close(fl.lora_B, b, rtol=0, atol=0)
    pattern = adapter_configs(ours)["default"].alpha_pattern
    assert pattern and pattern == theirs.peft_config["default"].alpha_pattern, pattern  # (ranks moved: 12 * k / 7)


def test_an_eva_file_on_target_parameters_loads_with_the_default_init(tmp_path):
    """PEFT writes "eva" for target_parameters adapters too (made without the EVA step); fastpeft's EVA is for module
    targets, so such a file loads with the default init, as before 2026-12-02 (the weights are the file's)."""
    base = _llama()
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=2, target_parameters=["self_attn.q_proj.weight"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    fastpeft.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "eva",
                                "eva_config": {"rho": 2.0}}))
    loaded = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert adapter_configs(loaded)["default"].init_lora_weights is True
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
