"""PEFT's base-rewriting inits, PiSSA (``"pissa"``, ``"pissa_niter_<n>"``) and OLoRA (``"olora"``), in ``inject`` and
``FastLoRALinear``: under a seed the factors and the residual base weights are PEFT's bit for bit (DoRA's magnitude
too in fp32), the model starts as its base, outputs, gradients and training follow PEFT's, files are written as
PEFT's and convert to plain LoRA on the original weights (``path_initial_model_for_weight_conversion``), ``unload``
gives the residual model, and what PEFT cannot do (or would do wrong) is refused before the model changes."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from conftest import assert_close_to_largest as _close
from conftest import loss_step, train_steps
from fastpeft import LoraConfig

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "pissa_niter_3", "olora"]


def _llama(dtype=torch.float32, tie=False):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _pair(base, **kw):
    cfg = {**dict(r=4, lora_alpha=8, target_modules=TARGETS), **kw}
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg))
    return theirs, ours


def _layers(theirs, ours, names=None):
    for name, fl in fastpeft.lora_layers(ours).items():
        if names is None or name.rsplit(".", 1)[-1] in names:
            yield name, theirs.base_model.model.get_submodule(name), fl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init", INITS)
def test_factors_and_residual_are_peft_bits(init, dtype):
    base = _llama(dtype)
    theirs, ours = _pair(base, init_lora_weights=init)
    for name, pl, fl in _layers(theirs, ours):
        torch.testing.assert_close(fl.lora_A, pl.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(fl.lora_B, pl.lora_B["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(fl.weight, pl.base_layer.weight, rtol=0, atol=0)
        assert not torch.equal(fl.weight, base.get_submodule(name).weight)  # W - s B A, not W
    assert fastpeft.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    with torch.no_grad():  # the model starts as its base (to W's rounding)
        want = base(IDS).logits.float()
        got = ours(IDS).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_magnitude_after_rewrite(init):
    """DoRA's magnitude ‖W_res + s B A‖ comes after the rewrite, as PEFT's: bit for bit in fp32; in bf16 PEFT forms the
    sum in bf16, fastpeft in fp32 then rounds once: within one bf16 step of PEFT's, and the exact norm rounded."""
    base = _llama()
    theirs, ours = _pair(base, init_lora_weights=init, use_dora=True)
    for _, pl, fl in _layers(theirs, ours):
        torch.testing.assert_close(fl.lora_magnitude_vector["default"], pl.lora_magnitude_vector["default"].weight,
                                   rtol=0, atol=0)
    base16 = _llama(torch.bfloat16)
    theirs, ours = _pair(base16, init_lora_weights=init, use_dora=True)
    for name, pl, fl in _layers(theirs, ours):
        w = fl.weight.double() + fl.scaling * fl.lora_B.double() @ fl.lora_A.double()
        exact = torch.linalg.vector_norm(w, dim=1)
        got, want = fl.lora_magnitude_vector["default"].double(), pl.lora_magnitude_vector["default"].weight.double()
        assert ((got - want).abs() <= 2.0 ** -7 * want.abs()).all()
        torch.testing.assert_close(got, exact.to(torch.bfloat16).double(), rtol=0, atol=0)


@pytest.mark.parametrize("init", INITS)
def test_outputs_gradients_and_training_follow_peft(init):
    base = _llama()
    theirs, ours = _pair(base, init_lora_weights=init)
    theirs.train()
    ours.train()
    key = {"lora_A.default.weight": "A", "lora_B.default.weight": "B", "lora_A_adapters.default": "A",
           "lora_B_adapters.default": "B"}

    def by_layer(n):
        for suffix, k in key.items():
            if n.endswith(suffix):
                return n.replace("base_model.model.", "")[:-len(suffix)] + k
        return None
    want_logits, want = loss_step(theirs, IDS, by_layer)
    got_logits, got = loss_step(ours, IDS, by_layer)
    _close(got_logits, want_logits)
    assert got.keys() == want.keys() and len(got) == 2 * 2 * len(TARGETS)
    for k in want:
        _close(got[k], want[k])
    lp, lf = train_steps(theirs, IDS, 3), train_steps(ours, IDS, 3)
    assert abs(lp[-1] - lf[-1]) <= 1e-4 * abs(lp[-1])


def test_conv1d_pissa_is_peft_and_starts_as_base():
    """GPT-2's Conv1D (W stored (in, out)): PEFT factors its transpose; so does fastpeft, writing through the view."""
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    c = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights="pissa", fan_in_fan_out=True)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**c))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**c))
    for name, fl in fastpeft.lora_layers(ours).items():
        pl = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(fl.weight, pl.base_layer.weight, rtol=0, atol=0)
        torch.testing.assert_close(fl.lora_A, pl.lora_A["default"].weight, rtol=0, atol=0)
    ids = IDS % 64
    with torch.no_grad():
        _close(ours(ids).logits, base(ids).logits)
        _close(ours(ids).logits, theirs(ids).logits)


def test_embeddings_take_peft_embedding_init():
    """PEFT gives an embedding its plain init under PiSSA / OLoRA (A zeros, B normal): the same draws here, its W
    untouched."""
    base = _llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights="pissa")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg))
    emb, pe = ours.model.embed_tokens, theirs.base_model.model.model.embed_tokens
    torch.testing.assert_close(emb.lora_A, pe.lora_embedding_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(emb.lora_B, pe.lora_embedding_B["default"], rtol=0, atol=0)
    assert torch.equal(emb.weight, base.model.embed_tokens.weight)


def test_layer_level_pissa_starts_as_base():
    torch.manual_seed(0)
    lin = nn.Linear(48, 80)
    x = torch.randn(7, 48)
    want = lin(x)
    for init in INITS:
        layer = fastpeft.FastLoRALinear.from_linear(copy.deepcopy(lin), r=8, lora_alpha=16, init_lora_weights=init)
        _close(layer(x), want)
        assert (layer.lora_B.abs().sum() > 0) and not torch.equal(layer.weight, lin.weight)
        with pytest.raises(ValueError, match="subtract a second time"):
            layer.reset_lora_parameters("pissa")
    layer = fastpeft.FastLoRALinear(48, 80, r=4, init_lora_weights="pissa")
    s = torch.linalg.svdvals((layer.weight + layer.scaling * layer.lora_B @ layer.lora_A).detach())
    # the factors carry W's top singular directions: the residual's top singular value is W's 5th
    torch.testing.assert_close(torch.linalg.matrix_norm(layer.weight.detach(), ord=2), s[4], rtol=1e-4, atol=0)


def _trained_pair(tmp_path, **kw):
    """PEFT and fastpeft, PiSSA, each: the initial adapter saved, 3 SGD steps, trained logits, converted file."""
    base = _llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa", **kw)
    out = {}
    for lib in ("peft", "fast"):
        torch.manual_seed(1)
        if lib == "peft":
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
            model.peft_config["default"].init_lora_weights = True  # PEFT's example: the initial adapter as plain LoRA
            model.save_pretrained(tmp_path / lib / "init")
            model.peft_config["default"].init_lora_weights = "pissa"
        else:
            model = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg))
            fastpeft.save_adapter(model, tmp_path / lib / "init")  # (its config says "pissa": read as it is)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            model(IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            logits = model(IDS).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / lib / "conv",
                                  path_initial_model_for_weight_conversion=str(tmp_path / lib / "init"))
        out[lib] = (model, logits)
    return base, out


@pytest.mark.parametrize("kw", [{}, dict(use_rslora=True), dict(rank_pattern={"q_proj": 2},
                                                                  alpha_pattern={"v_proj": 4}), dict(use_dora=True)],
                         ids=["plain", "rslora", "patterns", "dora"])
def test_conversion_to_lora_is_peft_file_and_gives_trained_model_on_original_base(tmp_path, kw):
    base, out = _trained_pair(tmp_path, **kw)
    _close(out["fast"][1], out["peft"][1], 1e-4)
    ours, theirs = (load_file(tmp_path / lib / "conv" / "adapter_model.safetensors") for lib in ("fast", "peft"))
    magnitudes = [k for k in ours if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == (2 * len(TARGETS) if kw.get("use_dora") else 0)  # (PEFT 0.21's file drops them)
    assert sorted(set(ours) - set(magnitudes)) == sorted(set(theirs) - set(magnitudes))
    for k in set(theirs) - set(magnitudes):
        _close(ours[k], theirs[k], 1e-4)
    cfg_o, cfg_p = (json.loads((tmp_path / lib / "conv" / "adapter_config.json").read_text())
                    for lib in ("fast", "peft"))
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora", "use_dora"):
        assert cfg_o[field] == pytest.approx(cfg_p[field]), field
    # on the original weights (not the residual): the trained model's outputs, in fastpeft and in PEFT
    loaded = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "fast" / "conv").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast" / "conv").eval()
    with torch.no_grad():
        _close(loaded(IDS).logits, out["fast"][1], 1e-5)
        _close(in_peft(IDS).logits, out["fast"][1], 1e-5)


def test_conversion_covers_embeddings_and_plain_lora(tmp_path):
    """An embedding's factors convert too (PEFT 0.21's conversion leaves them out of its file); a plain LoRA adapter
    (B0 = 0) converts to itself; another init (here False, B0 != 0) to its change since then, warned of as PEFT
    does."""
    base = _llama()
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    fastpeft.save_adapter(model, tmp_path / "false")
    with pytest.warns(UserWarning, match="init_lora_weights=False.*change since the initial adapter"):
        fastpeft.save_adapter(model, tmp_path / "zero", path_initial_model_for_weight_conversion=tmp_path / "false")
    zero = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "zero")
    with torch.no_grad():  # no change since the initial adapter: the base model
        _close(zero(IDS).logits, base(IDS).logits)
    for init in ("pissa", True):
        torch.manual_seed(1)
        model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                target_modules=["embed_tokens", "q_proj"]))
        d = tmp_path / str(init)
        fastpeft.save_adapter(model, d / "init")
        want = _perturbed(model)
        fastpeft.save_adapter(model, d / "conv", path_initial_model_for_weight_conversion=d / "init")
        cfg = json.loads((d / "conv" / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
        loaded = fastpeft.load_adapter(copy.deepcopy(base), d / "conv")
        with torch.no_grad():
            _close(loaded(IDS).logits, want)


def test_conversion_refuses_a_folder_of_another_adapter(tmp_path):
    base = _llama()
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    other = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=2, target_modules=TARGETS))
    fastpeft.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match=r"path_initial_model_for_weight_conversion=.*initial adapter has r=2, "
                                         r"adapter 'default' r=4"):
        fastpeft.save_adapter(model, tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        fastpeft.save_adapter(model, tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "none")


def test_conversion_of_an_untied_head_leaves_its_residual_out(tmp_path):
    """An untied head's file holds its base weight (PEFT's save_embedding_layers), here the residual W - s B0 A0: the
    converted file leaves it out (as PEFT's), so on the original model it is W + s [B, -B0] [A; A0] (a review found
    the residual written there: the head off by 0.26)."""
    base = _llama()
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                                            init_lora_weights="pissa"))
    fastpeft.save_adapter(model, tmp_path / "init")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "init" / "adapter_model.safetensors")
    with torch.no_grad():
        model.lm_head.lora_B.add_(0.01)
        want = model(IDS).logits
    fastpeft.save_adapter(model, tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not any(k.endswith("base_layer.weight") for k in load_file(tmp_path / "conv" / "adapter_model.safetensors"))
    for loaded in (fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "conv"),
                   peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "conv")):
        with torch.no_grad():
            _close(loaded.eval()(IDS).logits, want)


def test_save_pretrained_converts_every_adapter_before_writing_any(tmp_path):
    """save_pretrained with several adapters and one initial folder (PEFT's API): the one that cannot convert with it
    fails before any file is written (a review found the first adapter's files written, then the error)."""
    base = _llama()
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    fastpeft.save_adapter(model, tmp_path / "init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.inject(model, LoraConfig(r=2, target_modules=TARGETS), adapter_name="b")
    with pytest.raises(ValueError, match="initial adapter has r=4, adapter 'b' r=2"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / "out", selected_adapters=["default"],
                          path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_a_pissa_file_loads_on_the_original_model_as_peft_loads_it(tmp_path, init):
    """PEFT's load of a PiSSA / OLoRA file computes W - s B0 A0 again from the original W (exact SVD and QR are
    deterministic, and the residual does not depend on their signs), then loads A and B: the trained model. fastpeft's
    does the same; a randomized PiSSA (pissa_niter_<n>) cannot be drawn again: refused for a new adapter (PEFT's load
    then gives another model), loaded as any file into the model's adapter of that name."""
    base = _llama()
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init))
    want = _perturbed(model)
    fastpeft.save_adapter(model, tmp_path / "a")
    if init == "pissa_niter_2":
        fresh = copy.deepcopy(base)
        with pytest.raises(ValueError, match="pissa_niter_2.*randomized SVD.*path_initial_model_for_weight_conversion"):
            fastpeft.load_adapter(fresh, tmp_path / "a")
        assert not fastpeft.lora_layers(fresh)
        fastpeft.load_adapter(model, tmp_path / "a")  # (in place: a Trainer resume)
        with torch.no_grad():
            _close(model(IDS).logits, want)
        return
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        _close(ours(IDS).logits, want)
        _close(theirs(IDS).logits, want)


def test_unload_keeps_modes_and_from_linear_refusals_keep_the_linear():
    base = _llama().eval()
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
    model.eval()
    fastpeft.unload(model)
    assert not any(m.training for m in model.modules())  # (the new nn.Linear modules were in training mode)
    lin = nn.Linear(8, 3)
    with pytest.raises(ValueError, match="only 3 singular directions"):
        fastpeft.FastLoRALinear.from_linear(lin, r=4, init_lora_weights="pissa")
    assert lin.weight.requires_grad and lin.bias.requires_grad  # (were frozen by the refused wrap)


def test_files_unload_merge_and_to_peft(tmp_path):
    base = _llama()
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="olora"))
    want = _perturbed(model)
    fastpeft.save_adapter(model, tmp_path / "olora")
    assert json.loads((tmp_path / "olora" / "adapter_config.json").read_text())["init_lora_weights"] == "olora"
    # PEFT's file, as PEFT writes it; on the original model the load computes W - s B0 A0 again (QR and exact SVD are
    # deterministic), as PEFT's load does: the trained model
    again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "olora")
    with torch.no_grad():
        _close(again(IDS).logits, want)
    # to_peft: PEFT gets the adapter over the residual weights, not factored and subtracted again
    pm = fastpeft.to_peft(copy.deepcopy(model)).eval()
    with torch.no_grad():
        _close(pm(IDS).logits, want)
    # unload: the residual model; the adapter saved with init True loads onto it (PEFT's example's way)
    residual = fastpeft.unload(copy.deepcopy(model))
    assert not fastpeft.lora_layers(residual) and fastpeft.active_adapter(residual) is None
    cfg_path = tmp_path / "olora" / "adapter_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), init_lora_weights=True)))
    again = fastpeft.load_adapter(residual, tmp_path / "olora")
    with torch.no_grad():
        _close(again(IDS).logits, want)
    merged = fastpeft.merge_and_unload(model)
    with torch.no_grad():
        _close(merged(IDS).logits, want)


def test_unload_is_peft_unload():
    base = _llama()
    cfg = dict(r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg))
    with torch.no_grad():
        for (_, pl, fl) in _layers(theirs, ours):
            pl.lora_B["default"].weight.normal_()
            fl.lora_B.copy_(pl.lora_B["default"].weight)
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
        ours.lm_head.modules_to_save["default"].weight.add_(1.0)
    a, b = theirs.unload(), fastpeft.unload(ours)
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    assert not fastpeft.lora_layers(b)
    with torch.no_grad():
        _close(b(IDS).logits, a(IDS).logits)
    with torch.no_grad():
        assert not torch.equal(b.lm_head.weight, base.lm_head.weight)  # the trained copy, as PEFT's


def test_add_weighted_adapter_over_pissa_leaves_the_residual_alone():
    """The combined adapter is made with the default init (PEFT 0.21 runs PiSSA again for it, rewriting W twice)."""
    base = _llama()
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        want = model(IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.add_weighted_adapter(model, ["default"], [1.0], "w", combination_type="cat")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    fastpeft.set_adapter(model, "w")
    with torch.no_grad():
        _close(model(IDS).logits, want)


def test_a_second_adapter_beside_pissa_warns():
    base = _llama()
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    with pytest.warns(UserWarning, match=r"\['default'\].*PiSSA / OLoRA.*\['b'\]"):
        fastpeft.inject(model, LoraConfig(r=4, target_modules=TARGETS), adapter_name="b")


def _unchanged(model, before):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not fastpeft.lora_layers(model)


@pytest.mark.parametrize("case", ["tied-head", "conv", "r-too-large", "olora-conv1d", "sparse", "fp64",
                                  "target-parameters"])
def test_refusals_leave_the_model_unchanged(case):
    if case == "tied-head":
        model, cfg = _llama(tie=True), dict(target_modules=["lm_head", "q_proj"], init_lora_weights="pissa")
        words = r"'lm_head'.*tied to .*embed_tokens.*would not start as its base"
    elif case == "conv":
        model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(3, 4, 3))
        cfg, words = dict(target_modules=["0", "1"], init_lora_weights="olora"), "convolution.*Unknown initialization"
    elif case == "r-too-large":
        model, cfg = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3)), dict(target_modules=["0", "1"], r=4,
                                                                           init_lora_weights="pissa")
        words = r"matched '1'.*r=4: W \(3, 6\) has only 3 singular directions"
    elif case == "olora-conv1d":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                     n_positions=16))
        cfg, words = dict(target_modules=["c_attn"], init_lora_weights="olora"), "Conv1D.*fails at the first forward"
    elif case == "sparse":
        model = nn.Sequential(nn.Linear(8, 8))
        cfg, words = dict(target_modules=["0"], init_lora_weights="pissa", sparse_density=0.1), "sparse delta"
    elif case == "fp64":
        model = nn.Sequential(nn.Linear(8, 8).double())
        cfg, words = dict(target_modules=["0"], init_lora_weights="pissa"), "fp32 / fp16 / bf16 .*float64"
    else:
        with pytest.raises(ValueError, match="target_parameters.*PiSSA / OLoRA / LoftQ rewrite a layer's 2-D weight"):
            LoraConfig(target_parameters=["mlp.experts.down_proj"], init_lora_weights="pissa")
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=words):
        fastpeft.inject(model, LoraConfig(**{"r": 2, **cfg}))
    _unchanged(model, before)


def test_quantized_base_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4", module=layer)
    model = nn.Sequential(layer.to("cpu"))
    with pytest.raises(ValueError, match="bitsandbytes Linear4bit base.*floating-point W"):
        fastpeft.inject(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"))
    assert not fastpeft.lora_layers(model)


def test_qpissa_the_residual_quantized_and_the_adapter_on_it(tmp_path):
    """PiSSA's QPiSSA, PEFT's example's steps: PiSSA on the floating-point model, the initial adapter saved, the
    residual saved (``unload``), loaded in NF4, the adapter loaded on it with ``residual=True`` (without it the load
    would factor the 4-bit W again: refused). The principal part stays in full precision, so each layer starts closer
    to W than NF4 of W itself (QLoRA's start)."""
    pytest.importorskip("bitsandbytes")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a real model's spectrum: a few large directions over the noise
        for m in base.modules():
            if isinstance(m, nn.Linear):
                u = torch.randn(m.out_features, 4)
                m.weight.add_(u @ torch.randn(4, m.in_features) / 4)
    base.save_pretrained(tmp_path / "original")
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS,
                                                            init_lora_weights="pissa"))
    fastpeft.save_adapter(model, tmp_path / "init")
    fastpeft.unload(copy.deepcopy(model)).save_pretrained(tmp_path / "residual")
    q = dict(quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                  bnb_4bit_compute_dtype=torch.float32),
             device_map="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpissa = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "residual", **q)
        qlora = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "original", **q)
    with pytest.raises(ValueError, match="bitsandbytes Linear4bit base"):
        fastpeft.load_adapter(qpissa, tmp_path / "init")
    assert not fastpeft.lora_layers(qpissa)
    fastpeft.load_adapter(qpissa, tmp_path / "init", residual=True)
    fastpeft.inject(qlora, LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    for name, layer in fastpeft.lora_layers(qpissa).items():
        w = base.get_submodule(name).weight
        start = layer._dense() + layer.delta_weight()  # deq(NF4(W - s B0 A0)) + s B0 A0
        assert (start - w).norm() < (fastpeft.lora_layers(qlora)[name]._dense() - w).norm(), name
    with torch.no_grad():  # and the adapter is the initial one: the layer computes deq(NF4(W_res)) x + s B0 A0 x
        x = torch.randn(5, 64)  # (in training mode, no dropout: fastpeft's fp32 path; in eval on a CPU with
        # AVX512-BF16 bitsandbytes' repacked kernel serves, which rounds on its own, ~2e-3 here; before 2026-12-02
        # this ran in eval and failed on such CPUs)
        layer = fastpeft.lora_layers(qpissa)["model.layers.0.self_attn.q_proj"].train()
        _close(layer(x), x @ (layer._dense() + layer.delta_weight()).T)
    with pytest.raises(ValueError, match="residual=True, but the adapter .* init_lora_weights=True"):
        fastpeft.load_adapter(copy.deepcopy(base), _plain(tmp_path, base), residual=True)


def _plain(tmp_path, base):
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=2, target_modules=TARGETS))
    fastpeft.save_adapter(model, tmp_path / "plain")
    return tmp_path / "plain"


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        return model(IDS).logits


def test_files_made_after_residual_to_peft_reload_and_weighted_adapters_go_on_the_original(tmp_path):
    """From the third review: each route keeps the file's statement about the base true, so that every file below,
    loaded on the ORIGINAL model (fastpeft and PEFT), gives the model that saved it."""
    base = _llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights="pissa")
    torch.manual_seed(1)
    model = fastpeft.inject(copy.deepcopy(base), cfg)
    fastpeft.save_adapter(model, tmp_path / "init")

    def on_original(folder, want):
        for loaded in (fastpeft.load_adapter(copy.deepcopy(base), folder),
                       peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)):
            with torch.no_grad():
                _close(loaded.eval()(IDS).logits, want)

    # residual=True (QPiSSA's load) then the conversion: the head's saved base weight (the residual) left out
    res = fastpeft.load_adapter(fastpeft.unload(copy.deepcopy(model)), tmp_path / "init", residual=True)
    want = _perturbed(res)
    fastpeft.save_adapter(res, tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init")
    on_original(tmp_path / "conv", want)
    # to_peft: PEFT's config keeps "pissa" (its own save then loads on the original model)
    want = _perturbed(model)
    pm = fastpeft.to_peft(copy.deepcopy(model))
    assert pm.peft_config["default"].init_lora_weights == "pissa"
    pm.save_pretrained(tmp_path / "peft")
    on_original(tmp_path / "peft", want)
    # a PiSSA file into a plain adapter of that name: the model's init (what its base is) stays
    plain = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    fastpeft.save_adapter(model, tmp_path / "trained")
    fastpeft.load_adapter(plain, tmp_path / "trained")
    fastpeft.save_adapter(plain, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["init_lora_weights"] is True
    # add_weighted_adapter over a PiSSA adapter: the combination sits on the same residual, its config says "pissa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.add_weighted_adapter(model, ["default"], [0.5], "halved", combination_type="cat")
    fastpeft.set_adapter(model, "halved")
    with torch.no_grad():
        want = model(IDS).logits
    fastpeft.save_adapter(model, tmp_path / "halved", adapter_name="halved")
    on_original(tmp_path / "halved", want)


def test_accelerate_runs_a_peft_pissa_model():
    """A PeftModel made with PiSSA (PEFT rewrote W): fastpeft.accelerate computes its layers, outputs and gradients
    PEFT's."""
    base = _llama()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                      init_lora_weights="pissa_niter_2"))
    fast = copy.deepcopy(theirs)
    report = fastpeft.accelerate(fast, strict=True)
    assert "6 of 6" in str(report)
    want_logits, want = loss_step(theirs, IDS, lambda n: n if "lora_" in n else None)
    got_logits, got = loss_step(fast, IDS, lambda n: n if "lora_" in n else None)
    _close(got_logits, want_logits)
    assert got.keys() == want.keys() and got
    for k in want:
        _close(got[k], want[k])
