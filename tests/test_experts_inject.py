"""LoRA on Parameters through ``fastpeft.inject`` (PEFT's ``target_parameters``, ``FastLoRAParameter``), a mixture of
experts' expert weights and 2-D ones, against PEFT's ``ParamWrapper`` on tiny Qwen3-MoE and gpt-oss models: PEFT's
initial draws bit for bit, outputs, every gradient and AdamW steps, files both ways, several adapters, mixed batches,
merging, to_peft, PEFT's conversion of MoE configs, torch.compile."""
import copy
import warnings

import pytest
import torch

import fastpeft
from fastpeft.layers import FastLoRAParameter
from conftest import assert_close_report
from test_experts import TARGETS, VOCAB, gpt_oss, qwen3_moe

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
MODELS = {"qwen3-moe": qwen3_moe, "gpt-oss": gpt_oss}


@pytest.fixture(scope="module", params=list(MODELS))
def base(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))


def both(base, seed=0, **kw):
    """(PEFT's model, fastpeft's) from the same PEFT LoraConfig under the same seed."""
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "target_parameters": TARGETS, **kw}
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    torch.manual_seed(seed)
    fm = fastpeft.inject(copy.deepcopy(base), peft.LoraConfig(**kw))
    return pm, fm


def _peft_name(n):
    return n.removeprefix("base_model.model.").replace(".default.", ".")


def _our_name(n):
    return n.replace("lora_A_adapters.default", "lora_A.weight").replace("lora_B_adapters.default", "lora_B.weight")


def lora_params(model, peft_model):
    fix = _peft_name if peft_model else _our_name
    return {fix(n): p for n, p in model.named_parameters() if "lora_" in n}


def step(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.float().square().mean().backward()
    return logits.detach()


def assert_same(pm, fm, ids, rtol=1e-5, atol=1e-6, nested=True):
    assert_close_report(step(fm, ids), step(pm, ids), rtol=rtol, atol=atol, what="logits")
    gp = {n: p.grad for n, p in lora_params(pm, True).items() if p.grad is not None}
    gf = {n: p.grad for n, p in lora_params(fm, False).items() if p.grad is not None}
    assert gp.keys() == gf.keys() and gp and (not nested or any("experts.base_layer" in n for n in gp))
    for n in gp:
        assert_close_report(gf[n], gp[n], rtol=rtol, atol=atol, what=n)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_initial_factors_are_peft_s_bit_for_bit(base, init):
    """Under one seed inject draws PEFT's factors (q_proj's first, then each experts module's inner weight, then its
    outer), in PEFT's nesting: the module names and shapes are PEFT's."""
    pm, fm = both(base, init_lora_weights=init)
    mp, mf = lora_params(pm, True), lora_params(fm, False)
    assert mp.keys() == mf.keys()
    for n in mp:
        assert torch.equal(mf[n], mp[n]), n
    outer = fm.model.layers[0].mlp.experts
    assert isinstance(outer, FastLoRAParameter) and isinstance(outer.base_layer, FastLoRAParameter)
    assert (outer.parameter_name, outer.base_layer.parameter_name) == ("down_proj", "gate_up_proj")
    assert fastpeft.trainable_parameters(fm) == (sum(p.numel() for p in pm.parameters() if p.requires_grad),
                                                 sum(p.numel() for p in pm.parameters()))


def test_outputs_and_every_gradient_match_peft(base, ids):
    assert_same(*both(base, init_lora_weights=False), ids)


def test_adamw_steps_follow_peft(base, ids):
    pm, fm = both(base, init_lora_weights=False)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, fm)]
    for _ in range(3):
        for m, opt in zip((pm, fm), opts):
            step(m, ids)
            opt.step()
    pm.eval(), fm.eval()
    with torch.no_grad():
        assert_close_report(fm(ids).logits, pm(ids).logits, rtol=1e-4, atol=1e-5, what="logits after 3 steps")
    pm.train(), fm.train()


def test_files_both_ways(base, ids, tmp_path):
    """PEFT loads fastpeft's file (its config names the expert weights in target_parameters) and fastpeft PEFT's, with
    the same logits; a second load over the same adapter writes the factors in place."""
    pm, fm = both(base, init_lora_weights=False)
    with torch.no_grad():
        want = pm(ids).logits
    fastpeft.save_adapter(fm, tmp_path / "ours")
    config = fastpeft.read_adapter_config(tmp_path / "ours")
    assert config.target_modules == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert config.target_parameters == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                        for p in ("down_proj", "gate_up_proj")]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert_close_report(loaded(ids).logits, want, rtol=1e-5, atol=1e-6, what="PEFT loading fastpeft's file")
        assert_close_report(ours(ids).logits, want, rtol=1e-5, atol=1e-6, what="fastpeft loading PEFT's file")
    layer = ours.model.layers[1].mlp.experts.base_layer
    held = layer.lora_A
    before = held.detach().clone()
    with torch.no_grad():
        held.zero_()
    fastpeft.load_adapter(ours, tmp_path / "peft")  # over the same adapter: in place
    assert layer.lora_A is held and torch.equal(held, before)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")  # PEFT's
def test_one_weight_and_rank_pattern(base, ids):
    """One weight alone (a single layer in the experts module's place) and rank_pattern on the weight's name, as PEFT
    (its keys match '<module>.<param>')."""
    pm, fm = both(base, target_modules=None, target_parameters=["down_proj"], init_lora_weights=False,
                  rank_pattern={"layers.1.mlp.experts.down_proj": 2},
                  alpha_pattern={"layers.0.mlp.experts.down_proj": 3})
    layer = fm.model.layers[1].mlp.experts
    assert isinstance(layer, FastLoRAParameter) and not isinstance(layer.base_layer, FastLoRAParameter)
    assert layer.r == 2 and fm.model.layers[0].mlp.experts.r == 4
    assert fm.model.layers[0].mlp.experts.lora_alpha == 3 and layer.lora_alpha == 8
    assert_close_report(step(fm, ids), step(pm, ids), rtol=1e-5, atol=1e-6, what="logits")


def test_several_adapters_switch_disable_and_delete(base, ids):
    """A second adapter beside the first, on the same expert weights: set_adapter runs each (PEFT's outputs for it),
    disable_adapter the base model, delete_adapter leaves the other."""
    pm, fm = both(base, init_lora_weights=False)
    cfg = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=TARGETS, init_lora_weights=False)
    torch.manual_seed(5)
    pm.add_adapter("b", peft.LoraConfig(**cfg))
    torch.manual_seed(5)
    fastpeft.inject(fm, fastpeft.LoraConfig(**cfg), "b")
    with torch.no_grad():
        plain = base(ids).logits
        for name in ("default", "b"):
            pm.set_adapter(name)
            fastpeft.set_adapter(fm, name)
            assert_close_report(fm(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-6, what=name)
        with fastpeft.disable_adapter(fm):
            assert_close_report(fm(ids).logits, plain, rtol=1e-5, atol=1e-6, what="disabled")
        fastpeft.delete_adapter(fm, "default")
        pm.delete_adapter("default")
        assert_close_report(fm(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-6, what="b after deleting default")


def test_adapter_names_and_mixed_batch_rows_get_their_adapter(base, ids):
    """``model(ids, adapter_names=...)`` and ``mixed_batch``: each sequence gets what its adapter alone gives
    (PEFT refuses mixed batches on these layers), "__base__" the base model's."""
    _, fm = both(base, init_lora_weights=False)
    fastpeft.inject(fm, fastpeft.LoraConfig(r=2, target_parameters=TARGETS, init_lora_weights=False), "b")
    fm.eval()
    with torch.no_grad():
        alone = {}
        for name in ("default", "b"):
            fastpeft.set_adapter(fm, name)
            alone[name] = fm(ids).logits
        alone["__base__"] = base(ids).logits
        names = ["b", "__base__", "default"]
        got = fm(ids, adapter_names=names).logits
        with fastpeft.mixed_batch(fm, names):
            routed = fm(ids).logits
        beams = fm.generate(ids[:2], max_new_tokens=3, do_sample=False, num_beams=2, adapter_names=["b", "default"])
        for i, n in enumerate(["b", "default"]):
            fastpeft.set_adapter(fm, n)
            alone_beams = fm.generate(ids[i:i + 1], max_new_tokens=3, do_sample=False, num_beams=2)
            assert torch.equal(beams[i], alone_beams[0]), n
    for i, n in enumerate(names):
        assert_close_report(got[i], alone[n][i], rtol=1e-5, atol=1e-6, what=f"adapter_names row {i} ({n})")
        assert_close_report(routed[i], alone[n][i], rtol=1e-5, atol=1e-6, what=f"mixed_batch row {i} ({n})")
    fm.train()


def test_layer_adapter_ids_per_token():
    """``FastLoRAParameter(x, index, weights, adapter_ids)``: each token gets its adapter's update (-1: none), as the
    layer with that adapter active; gradients reach only the adapters the batch uses."""
    ex = copy.deepcopy(qwen3_moe().model.layers[0].mlp.experts)
    torch.manual_seed(0)
    layer = FastLoRAParameter(FastLoRAParameter(ex, "gate_up_proj", r=2, init_lora_weights=False), "down_proj", r=2,
                            init_lora_weights=False)
    for m in FastLoRAParameter.chain(layer):
        m.add_adapter("b", 4, 4, init_lora_weights=False)
    x = torch.randn(6, 32)
    index = torch.randint(0, 8, (6, 2), generator=torch.Generator().manual_seed(2))
    w = torch.rand(6, 2)
    want = {}
    with torch.no_grad():
        for n in ("default", "b", None):
            for m in FastLoRAParameter.chain(layer):
                m.set_adapter(n)
            want[n] = layer(x, index, w)
    for m in FastLoRAParameter.chain(layer):
        m.set_adapter("b")
    tid = torch.tensor([1, -1, 0, 1, 1, -1])
    got = layer(x, index, w, adapter_ids=tid)
    for t, j in enumerate(tid.tolist()):
        assert_close_report(got[t], want[["default", "b", None][j]][t], rtol=1e-5, atol=1e-6, what=f"token {t}")
    got.square().sum().backward()
    assert layer.lora_A_adapters["b"].grad is not None and layer.lora_A_adapters["default"].grad is None
    runs = layer(x, index, w, adapter_ids=torch.tensor([0, 1, -1]))  # (3 runs of 2 tokens)
    for t, n in enumerate(["default", "default", "b", "b", None, None]):
        assert_close_report(runs[t], want[n][t], rtol=1e-5, atol=1e-6, what=f"run token {t}")


def test_merge_unmerge_and_merge_and_unload(base, ids):
    """merge folds s B_e A_e into each expert's weight (same logits), unmerge restores it, merge_and_unload gives the
    experts modules back holding the merged weights."""
    _, fm = both(base, init_lora_weights=False)
    fm.eval()
    layers = [m for m in fm.modules() if isinstance(m, FastLoRAParameter)]
    before = [m.weight.detach().clone() for m in layers]
    with torch.no_grad():
        want = fm(ids).logits
        for m in layers:
            m.merge()
        assert_close_report(fm(ids).logits, want, rtol=1e-5, atol=1e-6, what="merged")
        for m in layers:
            m.unmerge()
        for m, w in zip(layers, before):
            assert_close_report(m.weight, w, rtol=1e-6, atol=1e-6, what="unmerged weight")
        fastpeft.merge_and_unload(fm)
        assert not any(isinstance(m, FastLoRAParameter) for m in fm.modules())
        assert type(fm.model.layers[0].mlp.experts).__name__.endswith("Experts")
        assert_close_report(fm(ids).logits, want, rtol=1e-5, atol=1e-6, what="after merge_and_unload")


def test_to_peft(base, ids):
    pm, fm = both(base, init_lora_weights=False)
    with torch.no_grad():
        want = pm(ids).logits
    converted = fastpeft.to_peft(fm)
    assert type(converted.base_model.model.model.layers[0].mlp.experts).__name__ == "ParamWrapper"
    with torch.no_grad():
        assert_close_report(converted(ids).logits, want, rtol=1e-5, atol=1e-6, what="to_peft")


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")  # PEFT's
def test_all_linear_and_v4_names_are_converted_as_peft_does(ids):
    """PEFT's get_peft_model converts a config for transformers 5's fused MoE layers (Qwen3-MoE): "all-linear" and the
    v4 names (gate_proj / up_proj / down_proj / gate) become target_parameters, gate_up_proj at twice the rank, the
    router's weight adapted too; inject does the same (before, it warned and left them out): the same trainable
    parameters, logits and gradients."""
    pytest.importorskip("peft.utils.transformers_weight_conversion")  # (PEFT's conversion: peft >= 0.18)
    import transformers

    base = qwen3_moe()
    for tm in ("all-linear", ["q_proj", "gate_proj", "up_proj", "down_proj", "gate"]):
        pm, fm = both(base, target_modules=tm, target_parameters=None, init_lora_weights=False)
        assert fastpeft.trainable_parameters(fm)[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
        router = fm.model.layers[0].mlp.gate
        assert isinstance(router, FastLoRAParameter) and router.parameter_name == "weight"
        gate_up = fm.model.layers[0].mlp.experts.base_layer  # gate's and up's LoRAs side by side: r and alpha doubled
        assert (gate_up.r, gate_up.lora_alpha, gate_up.scaling) == (8, 16, 2.0)
        assert_same(pm, fm, ids)
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     vocab_size=VOCAB)
    mixtral = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    pm, fm = both(mixtral, target_modules="all-linear", target_parameters=None, init_lora_weights=False)
    assert any(isinstance(m, FastLoRAParameter) for m in fm.modules())
    assert_same(pm, fm, ids)


def test_all_linear_on_gpt_oss_still_warns_of_its_experts():
    """gpt-oss has no such conversion in PEFT: "all-linear" leaves its expert weights (warned), target_parameters
    adapts them (no warning)."""
    base = gpt_oss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules="all-linear",
                                                                 target_parameters=TARGETS))
    with pytest.warns(UserWarning, match="fused expert weights"):
        fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules="all-linear"))


@pytest.mark.parametrize("targets", [["self_attn.q_proj.weight"], ["mlp.gate.weight"]], ids=["linear", "router"])
def test_a_2d_parameter_as_peft_computes_it(targets, ids, tmp_path):
    """A 2-D Parameter (a Linear's weight, Qwen3-MoE's router) takes LoRA as PEFT computes it there: the module called
    with W + s B A in its place; logits and gradients equal PEFT's, files load both ways, merge_and_unload gives the
    module back. Per-sequence adapters, which PEFT refuses there, give each row what its adapter alone gives (the
    module called once per adapter of the batch)."""
    base = qwen3_moe()
    pm, fm = both(base, target_modules=None, target_parameters=targets, init_lora_weights=False)
    assert_same(pm, fm, ids, nested=False)
    fastpeft.save_adapter(fm, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    fastpeft.inject(fm, fastpeft.LoraConfig(r=2, target_parameters=targets, init_lora_weights=False), "b")
    fm.eval()
    with torch.no_grad():
        alone = {"__base__": base(ids).logits}
        for name in ("b", "default"):
            fastpeft.set_adapter(fm, name)
            alone[name] = fm(ids).logits
        assert_close_report(loaded(ids).logits, alone["default"], rtol=1e-5, atol=1e-6, what="PEFT loading ours")
        names = ["b", "__base__", "default"]
        got = fm(ids, adapter_names=names).logits
        for i, n in enumerate(names):
            assert_close_report(got[i], alone[n][i], rtol=1e-5, atol=1e-6, what=f"adapter_names row {i} ({n})")
        fastpeft.merge_and_unload(fm)
        assert not any(isinstance(m, FastLoRAParameter) for m in fm.modules())
        assert_close_report(fm(ids).logits, alone["default"], rtol=1e-5, atol=1e-6, what="merged")


def test_bf16_model_fp32_adapters_as_accurate_as_peft(ids):
    """On a bf16 model the factors are fp32 Parameters (PEFT's autocast_adapter_dtype), and the logits' error against
    the fp32 model is within 2x PEFT's (plus a bf16 step)."""
    base = qwen3_moe()
    pm32, fm32 = both(base, init_lora_weights=False)
    pm, fm = both(copy.deepcopy(base).to(torch.bfloat16), init_lora_weights=False)
    fastpeft_factors = [p for n, p in fm.named_parameters() if "lora_" in n]
    assert fastpeft_factors and all(p.dtype == torch.float32 for p in fastpeft_factors)
    with torch.no_grad():
        ref = fm32(ids).logits
        err_peft = (pm(ids).logits.float() - ref).abs().max()
        err_ours = (fm(ids).logits.float() - ref).abs().max()
    assert err_ours <= 2 * err_peft + 2 ** -8 * ref.abs().max(), (err_ours, err_peft)


def test_compiled_fp32_model_matches_eager(ids):
    """torch.compile of an fp32 model: the loop form while tracing (grouped_mm lowers for bf16 only; before, the
    traced fp32 grouped_mm failed), logits and gradients as eager."""
    _, fm = both(qwen3_moe(), init_lora_weights=False)
    want = step(fm, ids)
    grads = {n: p.grad.clone() for n, p in fm.named_parameters() if p.grad is not None}
    got = step(torch.compile(fm, backend="eager"), ids)
    assert_close_report(got, want, rtol=1e-5, atol=1e-6, what="compiled logits")
    for n, p in fm.named_parameters():
        if p.grad is not None:
            assert_close_report(p.grad, grads[n], rtol=1e-5, atol=1e-6, what=n)


def test_offloaded_experts_refused_and_peft_inside_named(ids):
    """A Parameter accelerate offloads (on meta, loaded per call by its hook) is refused before any change, as an
    offloaded Linear is; PEFT's get_peft_model wrapping a ParamWrapper inside fastpeft's layers is named at the
    forward (it used to fail inside lora_experts' checks)."""
    accelerate = pytest.importorskip("accelerate")
    model = qwen3_moe()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    kinds = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match="accelerate offloads"):
        fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_parameters=TARGETS))
    assert [type(m).__name__ for m in model.modules()] == kinds
    fm = fastpeft.inject(qwen3_moe(), fastpeft.LoraConfig(r=2, target_parameters=TARGETS))
    pm = peft.get_peft_model(fm, peft.LoraConfig(r=2, target_modules=[], target_parameters=TARGETS), "second")
    with pytest.raises(TypeError, match="PEFT layer, sits inside fastpeft's LoRA layers"):
        pm(ids)


def test_review_fixes_subset_after_delete_tied_merge_exclusions_and_v4_files(ids, tmp_path):
    """From the review: an adapter on one weight after every adapter was deleted nests as in a fresh model (its file
    keys were the inner layer's, which neither PEFT nor fastpeft loaded); merge_and_unload of LoRA on a tied weight
    (Parameter of embed_tokens, tied to lm_head) gives it its own merged copy (it raised half-way);
    exclude_modules reaches PEFT's conversion of a regex; a transformers 4 MoE adapter file is refused by name."""
    base = qwen3_moe()
    fm = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_parameters=TARGETS))
    fastpeft.delete_adapter(fm, "default")
    assert not any(isinstance(m, FastLoRAParameter) for m in fm.modules())
    fastpeft.inject(fm, fastpeft.LoraConfig(r=2, target_parameters=["mlp.experts.gate_up_proj"],
                                            init_lora_weights=False), "x")
    fastpeft.save_adapter(fm, tmp_path / "x", "x")
    with torch.no_grad():
        want = fm(ids).logits
        again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "x")
        assert_close_report(again(ids).logits, want, rtol=1e-5, atol=1e-6, what="reloaded")
        assert_close_report(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x")(ids).logits, want,
                            rtol=1e-5, atol=1e-6, what="PEFT loading it")

    tied = copy.deepcopy(base)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="tied"):
        fm = fastpeft.inject(tied, fastpeft.LoraConfig(r=2, target_parameters=["embed_tokens.weight"],
                                                       init_lora_weights=False))
    fm.eval()
    with torch.no_grad():
        want = fm(ids).logits
        head = fm.lm_head.weight.detach().clone()
        with pytest.warns(UserWarning, match="tied"):
            fastpeft.merge_and_unload(fm)
        assert fm.model.embed_tokens.weight is not fm.lm_head.weight and torch.equal(fm.lm_head.weight, head)
        assert_close_report(fm(ids).logits, want, rtol=1e-5, atol=1e-6, what="merged tied")

    pytest.importorskip("peft.utils.transformers_weight_conversion")
    kw = dict(r=2, target_modules=r".*layers\.0\.self_attn\.(q_proj|k_proj)",
              exclude_modules=["model.layers.0.self_attn.q_proj"])
    pm, fm = both(base, target_parameters=None, **kw)
    assert fastpeft.trainable_parameters(fm)[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)

    folder = tmp_path / "v4"
    fastpeft.save_adapter(fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules=["q_proj"])),
                          folder)
    config = (folder / "adapter_config.json").read_text().replace('"target_modules": [', '"target_modules": ["gate", ')
    (folder / "adapter_config.json").write_text(config)
    with pytest.raises(ValueError, match="transformers 4's mixture-of-experts layout"):
        fastpeft.load_adapter(copy.deepcopy(base), folder)


@pytest.mark.parametrize("targets, bias", [(["self_attn.q_proj.weight"], "lora_only"),
                                           (["mlp.router.weight"], "lora_only"),
                                           (["embed_tokens.weight"], "none"), (["lm_head.weight"], "none")],
                         ids=["q_proj-lora_only", "router-lora_only", "embed_tokens", "lm_head"])
def test_2d_parameter_files_and_biases_as_peft(targets, bias, ids, tmp_path):
    """From the last review: bias="lora_only" trains and saves the module's bias as PEFT's ParamWrapper does (gpt-oss'
    q_proj and router have biases); an embedding's or the head's weight saves lora_A / lora_B, not PEFT's embedding
    keys nor the vocabulary matrix; files load both ways."""
    base = gpt_oss()
    pm, fm = both(base, target_modules=None, target_parameters=targets, init_lora_weights=False, bias=bias)
    assert fastpeft.trainable_parameters(fm)[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    pm.save_pretrained(tmp_path / "peft")
    fastpeft.save_adapter(fm, tmp_path / "ours")
    from safetensors.torch import load_file
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    with torch.no_grad():
        want = pm(ids).logits
        assert_close_report(fm(ids).logits, want, rtol=1e-5, atol=1e-6, what="logits")
        assert_close_report(fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")(ids).logits, want,
                            rtol=1e-5, atol=1e-6, what="fastpeft loading PEFT's file")
        assert_close_report(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")(ids).logits, want,
                            rtol=1e-5, atol=1e-6, what="PEFT loading fastpeft's file")


def test_models_without_moe_conversion_take_configs_as_before():
    """PEFT's conversion runs for the model types it converts only: a Llama's all-linear with layers_to_transform
    (which PEFT's LoraConfig refuses, fastpeft takes) injects as before (it raised PEFT's message)."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    model = fastpeft.inject(transformers.AutoModelForCausalLM.from_config(cfg),
                            fastpeft.LoraConfig(r=2, target_modules="all-linear", layers_to_transform=[0]))
    assert sorted({n.split(".")[2] for n in fastpeft.lora_layers(model)}) == ["0"]


def test_a_3d_parameter_of_another_module_as_peft_computes_it():
    """A 3-D Parameter of a module that is not a transformers experts module (another library's experts) takes LoRA
    as PEFT computes it, W + s B A per expert in the Parameter's place: outputs and gradients equal PEFT's."""

    class Stacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 5, 7))  # (experts, out, in)

        def forward(self, x):  # x (3, T, 7): expert e's rows through W_e
            return torch.einsum("eti,eoi->eto", x, self.w)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Stacked()

        def forward(self, x):
            return self.block(x)

    torch.manual_seed(0)
    base = Net()
    x = torch.randn(3, 4, 7)
    out = {}
    for lib in ("peft", "fastpeft"):
        torch.manual_seed(1)
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_parameters=["block.w"], init_lora_weights=False)
        model = peft.get_peft_model(copy.deepcopy(base), cfg) if lib == "peft" else \
            fastpeft.inject(copy.deepcopy(base), cfg)
        y = model(x)
        y.square().sum().backward()
        out[lib] = (y.detach(), sorted(p.grad.norm().item() for p in model.parameters() if p.grad is not None))
    assert_close_report(out["fastpeft"][0], out["peft"][0], rtol=1e-5, atol=1e-6, what="outputs")
    assert len(out["peft"][1]) == 2 and out["fastpeft"][1] == pytest.approx(out["peft"][1], rel=1e-5)
