"""Model surgery: PEFT's matching rules, freezing, bias modes, patterns, summaries, merge_and_unload."""
import json

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import FastLoRALinear, LoraConfig, ModulesToSaveWrapper


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x))


class Toy(nn.Module):
    """layers.{0,1}.attn.{q,k,v,o}_proj, layers.{i}.mlp (Sequential of Linear, GELU, Linear), norm, lm_head."""

    def __init__(self, d=16, vocab=24):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.attn = Attn(d)
            blk.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.layers.append(blk)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        for blk in self.layers:
            x = x + blk.attn(x)
            x = x + blk.mlp(x)
        return self.lm_head(self.norm(x))


def _toy():
    torch.manual_seed(0)
    return Toy()


def _adapted(model):
    return sorted(fastpeft.lora_layers(model))


def test_list_matches_exact_names_and_dotted_suffixes():
    m = fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj", "layers.1.attn.v_proj"]))
    assert _adapted(m) == ["layers.0.attn.q_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    # "proj" is a substring of "q_proj" but not a dotted suffix: no match.
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        fastpeft.inject(_toy(), LoraConfig(target_modules=["proj"]))
    m = fastpeft.inject(_toy(), LoraConfig(target_modules=["lm_head"]))
    assert _adapted(m) == ["lm_head"]
    # a string is a whole-name regex (PEFT's rule): the error says so and what to write instead
    with pytest.raises(ValueError, match=r"re.fullmatch.*\['q_proj'\].*'\.\*q_proj'"):
        fastpeft.inject(_toy(), LoraConfig(target_modules="q_proj"))


def test_no_match_names_gpt2_conv1d_layers_for_a_sparse_delta():
    """GPT-2's attention and MLP layers are transformers Conv1D: LoRA adapts them (tests/test_conv1d.py), a sparse
    delta does not; "all-linear" then finds only the head (excluded), and the error names the Conv1D layers."""
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32,
                                                                 n_positions=16))
    with pytest.raises(ValueError, match=r"(?s)\['transformer.h.0.attn.c_attn'.*Conv1D layers \(GPT-2 style\).*no "
                                         r"sparse delta"):
        fastpeft.inject(model, fastpeft.SparseDeltaConfig(target_modules="all-linear"))


def test_string_is_fullmatched():
    m = fastpeft.inject(_toy(), LoraConfig(target_modules=r"layers\.\d+\.attn\.(q|v)_proj"))
    assert _adapted(m) == [f"layers.{i}.attn.{p}_proj" for i in (0, 1) for p in "qv"]
    with pytest.raises(ValueError, match="matched no"):  # search would match; fullmatch does not
        fastpeft.inject(_toy(), LoraConfig(target_modules=r"q_proj"))


def test_all_linear_skips_output_head():
    m = fastpeft.inject(_toy(), LoraConfig(target_modules="all-linear"))
    names = _adapted(m)
    assert len(names) == 12 and "lm_head" not in names
    assert "layers.0.mlp.0" in names and "layers.1.mlp.2" in names


def test_layers_to_transform_with_all_linear_and_its_file_loads_in_peft(tmp_path):
    """PEFT refuses layers_to_transform with "all-linear"; fastpeft takes the pair as the list of every linear layer's
    name (the head still left out), and its file names the adapted layers in full, so PEFT loads exactly those."""
    m = fastpeft.inject(_toy(), LoraConfig(target_modules="all-linear", layers_to_transform=1, layers_pattern="layers"))
    assert len(_adapted(m)) == 6 and all(n.startswith("layers.1.") for n in _adapted(m))
    fastpeft.save_adapter(m, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == _adapted(m) and saved["layers_to_transform"] is None
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(_toy(), tmp_path)
    assert sorted(n.removeprefix("base_model.model.") for n, mod in pm.named_modules()
                  if isinstance(mod, peft.tuners.lora.LoraLayer)) == _adapted(m)


def test_exclude_modules_list_and_regex():
    m = fastpeft.inject(_toy(), LoraConfig(target_modules="all-linear", exclude_modules=["mlp.0", "o_proj"]))
    names = _adapted(m)
    assert not any(n.endswith("o_proj") or n.endswith("mlp.0") for n in names) and len(names) == 8
    m = fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r"layers\.0\..*"))
    assert _adapted(m) == ["layers.1.attn.q_proj", "layers.1.attn.v_proj"]


def test_non_linear_target_is_refused():
    with pytest.raises(ValueError, match=r"matched 'layers.0.attn', a Attn; fastpeft adapts nn.Linear"):
        fastpeft.inject(_toy(), LoraConfig(target_modules=["attn"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        fastpeft.inject(_toy(), LoraConfig(target_modules=["norm"]))


def test_model_is_unchanged_when_injection_fails():
    m = _toy()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in m.parameters()]
    with pytest.raises(ValueError):
        fastpeft.inject(m, LoraConfig(target_modules=["q_proj", "norm"]))  # q_proj ok, norm not
    assert not fastpeft.lora_layers(m)
    assert [p.requires_grad for p in m.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_default_targets_by_model_type_and_unknown_type():
    m = _toy()
    m.config = type("Cfg", (), {"model_type": "llama"})()
    assert _adapted(fastpeft.inject(m, LoraConfig())) == [f"layers.{i}.attn.{p}_proj" for i in (0, 1) for p in "qv"]
    with pytest.raises(ValueError, match="target_modules is None"):
        fastpeft.inject(_toy(), LoraConfig())


def test_default_targets_are_peft_own_where_peft_is_installed(monkeypatch):
    """With peft installed its own table decides (every model type it knows, e.g. gptj; phi's MLP too: before
    2026-12-01 fastpeft's shorter copy alone, phi adapting 40 % of PEFT's parameters); without it, fastpeft's copy."""
    peft_consts = pytest.importorskip("peft.utils.constants")
    from fastpeft import matching

    table = peft_consts.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    m = _toy()
    for model_type in ("phi", "gptj", "llama", "deberta-v2"):
        m.config = type("Cfg", (), {"model_type": model_type})()
        assert matching.default_targets(m) == list(table[model_type])
    m.config = type("Cfg", (), {"model_type": "distilbert"})()  # fastpeft's own, where PEFT has none
    assert matching.default_targets(m) == matching.DEFAULT_TARGETS["distilbert"]
    monkeypatch.setattr(matching, "_peft_default_targets", lambda: {})
    m.config = type("Cfg", (), {"model_type": "phi"})()
    assert matching.default_targets(m) == ["q_proj", "v_proj", "fc1", "fc2"]
    m.config = type("Cfg", (), {"model_type": "gptj"})()
    with pytest.raises(ValueError, match="no default targets for model type 'gptj'"):
        matching.default_targets(m)


def test_only_lora_parameters_train_and_output_is_unchanged():
    m = _toy()
    x = torch.randn(3, 16)
    y0 = m(x)
    fastpeft.inject(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(m(x), y0)  # B = 0 at init
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attn.{p}_proj.lora_{ab}_adapters.default" for i in (0, 1) for p in "qv"
                         for ab in "AB"}


def test_bias_modes():
    m = fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    assert {n for n, p in m.named_parameters() if p.requires_grad and "bias" in n} == \
        {"layers.0.attn.q_proj.bias", "layers.1.attn.q_proj.bias"}
    m = fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj"], bias="all"))
    biases = {n for n, p in m.named_parameters() if "bias" in n}
    assert {n for n, p in m.named_parameters() if p.requires_grad and "bias" in n} == biases
    assert "norm.bias" in biases


def test_rank_and_alpha_patterns():
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"layers.0.attn.q_proj": 2, r"v_proj": 4}, alpha_pattern={"q_proj": 4})
    layers = fastpeft.lora_layers(fastpeft.inject(_toy(), cfg))
    assert layers["layers.0.attn.q_proj"].r == 2 and layers["layers.0.attn.q_proj"].lora_alpha == 4
    assert layers["layers.1.attn.q_proj"].r == 8 and layers["layers.1.attn.q_proj"].scaling == 0.5
    assert layers["layers.1.attn.v_proj"].r == 4 and layers["layers.1.attn.v_proj"].scaling == 4.0


def test_use_rslora_and_dropout_reach_layers():
    layers = fastpeft.lora_layers(fastpeft.inject(_toy(), LoraConfig(r=16, lora_alpha=8, lora_dropout=0.1,
                                                                      use_rslora=True, target_modules=["q_proj"])))
    assert all(lay.scaling == 2.0 and lay.lora_dropout == 0.1 for lay in layers.values())


def test_modules_to_save_wraps_a_trainable_copy():
    m = _toy()
    head_w = m.lm_head.weight.detach().clone()
    fastpeft.inject(m, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(m.lm_head, ModulesToSaveWrapper)
    assert not m.lm_head.original_module.weight.requires_grad
    assert m.lm_head.modules_to_save["default"].weight.requires_grad
    assert m.lm_head.weight.data_ptr() == m.lm_head.modules_to_save["default"].weight.data_ptr()
    with torch.no_grad():
        m.lm_head.modules_to_save["default"].weight.add_(1.0)
    assert torch.equal(m.lm_head.original_module.weight, head_w)
    # A module kept whole is never a LoRA target, even under "all-linear".
    m2 = fastpeft.inject(_toy(), LoraConfig(target_modules="all-linear", modules_to_save=["mlp"]))
    assert not any(".mlp." in n for n in fastpeft.lora_layers(m2))
    with pytest.raises(ValueError, match="modules_to_save"):
        fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_trainable_parameters_and_peft_style_summary(capsys):
    m = fastpeft.inject(_toy(), LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, total = fastpeft.trainable_parameters(m)
    assert trainable == 2 * (4 * 16 + 16 * 4)
    assert total == sum(p.numel() for p in _toy().parameters()) + trainable
    fastpeft.print_trainable_parameters(m)
    out = capsys.readouterr().out.strip()
    assert out == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def test_inject_twice_and_bad_config_type():
    m = fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        fastpeft.inject(m, LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(TypeError, match="config must be a fastpeft.LoraConfig"):
        fastpeft.inject(_toy(), {"r": 8})
    with pytest.raises(ValueError, match="adapter name must be a non-empty str without '.'"):
        fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj"]), adapter_name="a.b")


def test_second_adapter_goes_beside_the_first():
    m = fastpeft.inject(_toy(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    x = torch.randn(3, 16)
    y_first = m(x)
    fastpeft.inject(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "second")
    q = m.layers[0].attn.q_proj
    assert q.adapter_names == ["default", "second"] and q.active_adapter == "second" and q.r == 2
    assert m.layers[0].attn.v_proj.adapter_names == ["second"]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".second") for n in trainable)
    fastpeft.set_adapter(m, "default")
    torch.testing.assert_close(m(x), y_first)  # v_proj has no "default": it runs its base
    assert m.layers[0].attn.v_proj.active_adapter is None
    assert all(n.endswith(".default") for n, p in m.named_parameters() if p.requires_grad)
    fastpeft.set_adapter(m, None)
    torch.testing.assert_close(m(x), _toy()(x))
    with pytest.raises(ValueError, match="'third' is not an adapter of this model"):
        fastpeft.set_adapter(m, "third")
    fastpeft.delete_adapter(m, "default")
    assert q.adapter_names == ["second"] and fastpeft.active_adapter(m) is None
    with pytest.raises(ValueError, match="not an adapter"):
        fastpeft.delete_adapter(m, "default")


@pytest.mark.parametrize("kw,exc,msg", [
    ({"r": -1}, ValueError, "r must be a positive int"),
    ({"lora_dropout": 2.0}, ValueError, "lora_dropout"),
    ({"bias": "some"}, ValueError, "bias must be one of"),
    ({"target_modules": 3}, TypeError, "target_modules must be a str"),
    ({"target_modules": []}, ValueError, "target_modules must be a regex string or a non-empty list"),
    ({"target_modules": "(unclosed"}, ValueError, "not a valid regex"),
    ({"rank_pattern": {"q_proj": 0}}, ValueError, r"rank_pattern\['q_proj'\] must be a positive int"),
    ({"alpha_pattern": []}, TypeError, "alpha_pattern must be a dict"),
    ({"init_lora_weights": "mica"}, ValueError, "init_lora_weights"),
], ids=["r", "dropout", "bias", "targets-int", "targets-empty", "targets-regex", "rank-pattern", "alpha-pattern",
        "init"])
def test_bad_configs(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        LoraConfig(**kw)


def test_sets_of_targets_are_accepted():
    assert LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]


def test_merge_and_unload_restores_plain_modules():
    m = fastpeft.inject(_toy(), LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"],
                                           init_lora_weights=False))
    with torch.no_grad():
        m.lm_head.modules_to_save["default"].weight.mul_(2)
    x = torch.randn(4, 16)
    y = m(x)
    fastpeft.merge_and_unload(m)
    assert not fastpeft.lora_layers(m)
    assert not any(isinstance(mod, (FastLoRALinear, ModulesToSaveWrapper)) for mod in m.modules())
    assert type(m.layers[0].attn.q_proj) is nn.Linear
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    # And the model can take a new adapter.
    fastpeft.inject(m, LoraConfig(target_modules=["q_proj"]))


def test_gradients_flow_through_injected_model():
    m = fastpeft.inject(_toy(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1,
                                           init_lora_weights=False))
    m(torch.randn(5, 16)).sum().backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_what_fastpeft_leaves_unadapted_is_warned_of():
    """Under all-linear, fused mixture-of-experts weights (3-D Parameters, as transformers 5 keeps Mixtral's experts)
    are named in a warning (PEFT adapts them through target_parameters; fastpeft nn.Linear modules only), and list
    entries of target_modules that match no module are named (a recipe's w1 / w2 / w3): before 2026-12-01 both
    were silent."""
    import warnings

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 32, 16))

    class Fused(nn.Module):  # JetMoE names its fused MLP experts input_linear / output_linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 16, 8))

    m = _toy()
    m.layers[0].experts = Experts()
    m.layers[1].input_linear = Fused()
    m.patch = nn.Conv2d(3, 4, 2)  # a convolution's 4-D kernel: left alone under all-linear by PEFT too, not named
    with pytest.warns(UserWarning, match=r"fused expert weights as they are: \['layers.0.experts.gate_up_proj', "
                                         r"'layers.1.input_linear.weight'\]"):
        fastpeft.inject(m, LoraConfig(target_modules="all-linear"))
    with pytest.warns(UserWarning, match=r"entries \['w1', 'w3'\] match no module") as caught:
        fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj", "w1", "v_proj", "w3"]))
    assert {w.filename for w in caught} == {__file__}  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj", "v_proj"]))
        fastpeft.inject(_toy(), LoraConfig(target_modules="all-linear"))
        # loading a file whose list names modules this model lacks (PEFT keeps the recipe's list): no warning
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            fastpeft.save_adapter(fastpeft.inject(_toy(), LoraConfig(target_modules=["q_proj"])), d)
            cfg = json.loads(open(f"{d}/adapter_config.json").read())
            cfg["target_modules"] = ["q_proj", "fc1", "dense"]
            open(f"{d}/adapter_config.json", "w").write(json.dumps(cfg))
            fastpeft.load_adapter(_toy(), d)
        # PEFT's defaults (target_modules=None) may name modules of several model families: no warning
        m = _toy()
        m.config = type("Cfg", (), {"model_type": "blip-2"})()
        fastpeft.inject(m, LoraConfig())


def test_default_targets_given_as_a_pattern_stay_one(monkeypatch):
    """PEFT's table holds some defaults as one regex (gemma4's): kept a string, not split into characters."""
    from fastpeft import matching
    monkeypatch.setattr(matching, "_peft_default_targets", lambda: {"gemma4": r".*attn\.(q|v)_proj"})
    m = _toy()
    m.config = type("Cfg", (), {"model_type": "gemma4"})()
    assert matching.default_targets(m) == r".*attn\.(q|v)_proj"
    assert _adapted(fastpeft.inject(m, LoraConfig())) == [f"layers.{i}.attn.{p}_proj" for i in (0, 1) for p in "qv"]


LAYER_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "layers.2.q_proj",
               "transformer.h.3.attn.c_attn", "model.layers.1.experts.5.w1", "encoder.layer.0.attention.self.query",
               "blocks.1.mlp.0", "q_proj", "model.decoder.layers.4.fc1", "h.0.attn"]


@pytest.mark.parametrize("layers, pattern", [(0, None), ([1, 3], None), ([11, 2], None), ([0, 1], "layers"),
                                             (3, "h"), ([0, 5], ["layer", "h"]), ([1], "blocks"), (4, "decoder")],
                         ids=lambda v: repr(v))
def test_layer_filter_is_peft_s(layers, pattern):
    """``in_layers`` keeps exactly the names PEFT's ``check_target_module_exists`` keeps for a suffix match,
    with its quirks: the first index of the name (layers.1, not experts.5), none without a prefix (layers.2.q_proj
    has no index unless layers_pattern names it)."""
    peft_tuners = pytest.importorskip("peft.tuners.tuners_utils")
    peft_lora = pytest.importorskip("peft")
    from fastpeft.matching import in_layers
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in LAYER_NAMES})
    config = peft_lora.LoraConfig(target_modules=suffixes, layers_to_transform=layers, layers_pattern=pattern)
    for name in LAYER_NAMES:
        theirs = bool(peft_tuners.check_target_module_exists(config, name))
        exact = name in suffixes  # named in full: PEFT keeps it whatever its index
        assert (exact or in_layers(name, layers, pattern)) == theirs, (name, layers, pattern)


@pytest.mark.parametrize("saved", ["embed_tokens", "lm_head"])
def test_merging_a_saved_copy_of_a_tied_embedding_unties_the_config(tmp_path, saved):
    """modules_to_save on one of a tied pair: the trained copy and the other's base weight differ after the merge, so
    tie_word_embeddings goes False (as PEFT's merge); before 2026-12-01 it stayed True, and a reload then re-tied
    them (logits 11.8 off after resize_token_embeddings)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = fastpeft.inject(transformers.LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"],
                                                                           modules_to_save=[saved]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 64, (2, 5))
    want = model.eval()(ids).logits.detach()
    with pytest.warns(UserWarning, match="tie_word_embeddings is set False"):
        merged = fastpeft.merge_and_unload(model)
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again.resize_token_embeddings(64)  # re-ties by the config: must not
    torch.testing.assert_close(again(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_a_refused_inject_leaves_no_hooks_or_instance_methods():
    """inject's hooks (Trainer's save_pretrained, adapter_names on forward / generate) go on only once every check
    passed (before 2026-12-01 a refused inject left them on the model)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="matched no"):
        fastpeft.inject(model, LoraConfig(target_modules=["nothing_like_this"]))
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not {"save_pretrained", "load_state_dict", "generate"} & set(model.__dict__)
    fastpeft.inject(model, LoraConfig(target_modules=["q_proj"]))
    assert len(model._forward_pre_hooks) == 1 and "generate" in model.__dict__
