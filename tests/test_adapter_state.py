"""Model-level adapter state found wrong by the 2026-12-01 reviews: switching off and deleting a sparse delta alone,
loading it over itself (Trainer's resume), deleting the active adapter, refusals checked before any layer changes
(merged layers, hand-made sparse layers, meta and offloaded layers), re-picking positions on merged RoSA layers, new
layers in their parent's mode, mixed_batch's rows_per_sequence per model and under activation checkpointing, a merge
into a tied output head, a LoRA'd output embedding's base weight in the file, and the message for an adapter added
to single layers only."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import LoraConfig, SparseDeltaConfig
from fastpeft.inject import adapter_configs
from test_inject import Toy


def _x(seed=1):
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sparse_model(seed=0):
    torch.manual_seed(seed)
    m = Toy().eval()
    base = m(_x()).detach()
    fastpeft.inject(m, SparseDeltaConfig(density=0.2, target_modules="all-linear"))
    with torch.no_grad():
        for layer in fastpeft.sparse_layers(m).values():
            layer.delta_values.normal_()
    return m, base


def test_sparse_delta_alone_switches_off_and_deletes():
    """set_adapter(None) runs the base with the delta frozen (it kept adding it), set_adapter back restores it,
    merged layers refuse both calls before any change, and delete_adapter puts plain nn.Linear layers back."""
    m, base = _sparse_model()
    adapted = m(_x()).detach()
    assert not torch.allclose(adapted, base)
    fastpeft.set_adapter(m, None)
    assert torch.equal(m(_x()), base)
    assert not any(p.requires_grad for p in m.parameters())
    fastpeft.set_adapter(m, "default")
    assert torch.equal(m(_x()), adapted)
    assert all(layer.delta_values.requires_grad for layer in fastpeft.sparse_layers(m).values())
    layer = next(iter(fastpeft.sparse_layers(m).values()))
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        fastpeft.set_adapter(m, None)
    with pytest.raises(RuntimeError, match="merged"):
        fastpeft.delete_adapter(m, "default")
    assert fastpeft.active_adapter(m) == "default" and torch.allclose(m(_x()), adapted, atol=1e-5)
    layer.unmerge()
    fastpeft.delete_adapter(m, "default")
    assert not fastpeft.sparse_layers(m) and not adapter_configs(m)
    assert all(type(mod) is nn.Linear for n, mod in m.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(m(_x()), base, atol=1e-5, rtol=0)  # (W after a merge and an unmerge: rounding)


def test_sparse_delta_loads_over_itself_and_resumes_through_load_state_dict(tmp_path):
    """load_adapter over the model's own sparse delta, and Trainer's resume through load_state_dict, replace its
    values (both raised: plan_lora refused the SparseDeltaLinear targets)."""
    m, _ = _sparse_model()
    want = m(_x()).detach()
    fastpeft.save_adapter(m, tmp_path / "a")
    saved = {k: v.clone() for k, v in m.state_dict().items() if "delta" in k}
    with torch.no_grad():
        for layer in fastpeft.sparse_layers(m).values():
            layer.delta_values.zero_()
    fastpeft.load_adapter(m, tmp_path / "a")
    assert torch.equal(m(_x()), want)
    with torch.no_grad():
        for layer in fastpeft.sparse_layers(m).values():
            layer.delta_values.zero_()
    from safetensors.torch import load_file
    result = m.load_state_dict(load_file(tmp_path / "a" / "adapter_model.safetensors"), False)  # Trainer's resume
    assert not result.unexpected_keys and torch.equal(m(_x()), want)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in saved.items())


def _lora_model(names=("a",), seed=0):
    torch.manual_seed(seed)
    m = Toy().eval()
    for i, name in enumerate(names):
        fastpeft.inject(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                        adapter_name=name)
    return m


@pytest.mark.parametrize("names", [("a",), ("a", "b")])
def test_deleting_the_active_adapter_leaves_none_active(names):
    """delete_adapter of the active adapter (alone, or beside another) leaves none active and the base model's
    outputs (it raised KeyError with the adapter half deleted)."""
    m = _lora_model(names)
    base = Toy()
    base.load_state_dict({k: v for k, v in _lora_model(()).state_dict().items()})
    fastpeft.set_adapter(m, names[-1])
    fastpeft.delete_adapter(m, names[-1])  # before 2026-12-01: KeyError, the model half deleted
    assert fastpeft.active_adapter(m) is None and list(adapter_configs(m)) == list(names[:-1])
    assert torch.equal(m(_x()), base.eval()(_x()))
    for name in names[:-1]:
        fastpeft.set_adapter(m, name)
        fastpeft.delete_adapter(m, name)
    assert not adapter_configs(m)


def test_refusals_on_merged_layers_change_no_layer():
    """One merged layer among several: set_adapter / delete_adapter refuse before switching or deleting anywhere."""
    m = _lora_model(("a", "b"))
    fastpeft.set_adapter(m, "a")
    layers = list(fastpeft.lora_layers(m).values())
    layers[-1].merge()  # the last layer only: a refusal found there must not leave the first ones changed
    before = _state(m)
    with pytest.raises(RuntimeError, match="merged"):
        fastpeft.set_adapter(m, "b")
    with pytest.raises(RuntimeError, match="merged"):
        fastpeft.delete_adapter(m, "a")
    assert [layer.active_adapter for layer in layers] == ["a"] * len(layers)
    assert all(layer.adapter_names == ["a", "b"] for layer in layers) and _same(_state(m), before)


def test_rosa_positions_cannot_be_repicked_on_a_merged_layer():
    """set_sparse_delta and select_by_gradients refuse a merged RoSA layer (W holds the old delta: unmerge took the
    new one out, leaving the old in W for good), with every layer unchanged, and unmerge restores W."""
    torch.manual_seed(0)
    m = Toy()
    fastpeft.inject(m, LoraConfig(r=2, target_modules=["q_proj"], sparse_density=0.2, init_lora_weights=False))
    layers = list(fastpeft.lora_layers(m).values())
    with torch.no_grad():
        for layer in layers:
            layer.sparse_delta().delta_values.normal_()
    w0 = [layer.weight.clone() for layer in layers]
    layers[1].merge()
    before = _state(m)
    with pytest.raises(RuntimeError, match="merged"):  # W holds the old delta: unmerge would take the new one out
        layers[1].set_sparse_delta("default", torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(RuntimeError, match="merged"):  # checked for every layer before any is scored or changed
        fastpeft.select_by_gradients(m, [_x()], lambda model, x: model(x).square().mean(), progress=False)
    assert _same(_state(m), before)
    layers[1].unmerge()
    torch.testing.assert_close(layers[1].weight, w0[1], atol=1e-6, rtol=0)


def test_failed_select_positions_keeps_the_spec():
    """select_positions on a merged layer refuses before its selection rule changes."""
    torch.manual_seed(0)
    m = Toy()
    fastpeft.inject(m, SparseDeltaConfig(density=0.2, target_modules=["q_proj"]))
    layer = next(iter(fastpeft.sparse_layers(m).values()))
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        layer.select_positions(layer.weight, "magnitude")
    assert layer.selection == "random"


def test_loaded_layers_take_their_parent_mode(tmp_path):
    """load_adapter's layers take the mode of the module they sit in: an eval model serves without dropout (they
    were in training mode: dropout, two no-grad calls differing), an eval block of a training model stays eval."""
    torch.manual_seed(0)
    src = Toy()
    fastpeft.inject(src, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"], init_lora_weights=False))
    fastpeft.save_adapter(src, tmp_path)
    m = Toy().eval()
    fastpeft.load_adapter(m, tmp_path, trainable=False)
    assert not any(layer.training for layer in fastpeft.lora_layers(m).values())
    with torch.no_grad():
        assert torch.equal(m(_x()), m(_x()))
    m = Toy().train()
    m.layers[0].eval()
    fastpeft.load_adapter(m, tmp_path)
    assert [m.layers[i].attn.q_proj.training for i in (0, 1)] == [False, True]


def test_rows_per_sequence_belongs_to_each_model():
    """Nested mixed_batch blocks on two models keep their own rows_per_sequence (a process-wide k let one block
    route the other model's batch)."""
    one, two = _lora_model(("a", "b"), seed=0), _lora_model(("a", "b"), seed=1)
    x4 = torch.randn(4, 3, 16)
    with fastpeft.mixed_batch(one, ["a", "b"], rows_per_sequence=2):
        want = one(x4)
        with fastpeft.mixed_batch(two, ["a", "b"]):  # its own k = 1 does not replace one's
            assert torch.equal(one(x4), want)
            with pytest.raises(ValueError, match="batch size 4"):
                two(x4)
    with fastpeft.mixed_batch(one, ["a", "b"]), fastpeft.mixed_batch(two, ["a", "b"], rows_per_sequence=2):
        with pytest.raises(ValueError, match="batch size 4"):  # before 2026-12-01: routed with two's k
            one(x4)
        two(x4)


def test_merge_and_unload_unties_a_tied_output_head():
    """A delta on GPT-2's tied lm_head: inject warns; merge_and_unload gives the head its own merged copy (a layer
    merged before is unmerged first), keeps the embeddings and the outputs, sets tie_word_embeddings False."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    assert m.lm_head.weight is m.transformer.wte.weight
    wte = m.transformer.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied"):
        fastpeft.inject(m, SparseDeltaConfig(density=0.2, target_modules=["lm_head"]))
    with torch.no_grad():
        m.lm_head.delta_values.normal_()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    want = m(input_ids=ids).logits.detach()
    m.lm_head.merge()  # a merged layer on the tied weight: taken out again before the head gets its own copy
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        fastpeft.merge_and_unload(m)
    assert m.lm_head.weight is not m.transformer.wte.weight and not m.config.tie_word_embeddings
    torch.testing.assert_close(m.transformer.wte.weight, wte, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_no_tied_warning_for_untied_targets():
    """The tie check excludes the layer's own names: untied targets warn nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _lora_model()


def test_an_adapter_added_to_single_layers_is_pointed_to_the_model_level_ways():
    """A name added with FastLoRALinear.add_adapter is not the model's: the error says how to add one."""
    m = _lora_model()
    for layer in fastpeft.lora_layers(m).values():
        layer.add_adapter("b", 2, 2)
    for call in (lambda: fastpeft.set_adapter(m, "b"), lambda: fastpeft.save_adapter(m, "/nonexistent", "b")):
        with pytest.raises(ValueError, match=r"'b' is not an adapter of this model; it has \['a'\]; .*"
                                             r"FastLoRALinear.add_adapter.*fastpeft.inject"):
            call()


def test_a_switched_off_sparse_delta_stays_off_and_frozen(tmp_path):
    """A load over a switched-off sparse delta keeps it off and frozen; select_by_gradients says it is off."""
    m, base = _sparse_model()
    fastpeft.save_adapter(m, tmp_path)
    fastpeft.set_adapter(m, None)
    fastpeft.load_adapter(m, tmp_path)  # over itself: the values replaced, the layers still off and frozen
    assert torch.equal(m(_x()), base) and not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="switched off .*set_adapter"):
        fastpeft.select_by_gradients(m, [_x()], lambda model, x: model(x).sum(), progress=False)


def test_inject_refuses_a_hand_made_sparse_layer_before_changing_the_model():
    """Only a load over the model's own sparse adapter takes SparseDeltaLinear targets (plan_lora(reload=True))."""
    m = nn.Sequential(fastpeft.SparseDeltaLinear(8, 8, density=0.5), nn.Linear(8, 8))
    flags = [p.requires_grad for p in m.parameters()]
    with pytest.raises(ValueError, match="a SparseDeltaLinear; fastpeft adapts nn.Linear modules only"):
        fastpeft.inject(m, SparseDeltaConfig(density=0.1, target_modules=["0", "1"]))
    assert [p.requires_grad for p in m.parameters()] == flags and not adapter_configs(m)


def test_a_lora_output_embedding_saves_its_base_weight_as_peft(tmp_path):
    """PEFT writes a LoRA'd lm_head's base weight (``save_embedding_layers="auto"``): a resized vocabulary's new
    rows travel with the adapter. fastpeft wrote none (21 off in the new tokens' logits after a round trip)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    base.resize_token_embeddings(44, mean_resizing=False)
    m = copy.deepcopy(base)
    with torch.no_grad():
        m.lm_head.weight[40:].normal_()
    fastpeft.inject(m, LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    fastpeft.save_adapter(m, tmp_path)
    from safetensors.torch import load_file
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ids = torch.tensor([[1, 41, 5, 43]])
    back = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, m(input_ids=ids).logits)


def test_load_adapter_refuses_a_model_on_meta(tmp_path):
    """A copy into meta tensors keeps nothing: refused, naming the parameters, before any change."""
    torch.manual_seed(0)
    src = Toy()
    fastpeft.inject(src, LoraConfig(r=2, target_modules=["q_proj"]))
    fastpeft.save_adapter(src, tmp_path)
    with torch.device("meta"):
        m = Toy()
    with pytest.raises(ValueError, match="goes on are on the meta device .*load the model's weights first"):
        fastpeft.load_adapter(m, tmp_path)
    assert not adapter_configs(m)


def test_inject_refuses_a_layer_accelerate_offloads():
    """An offloaded target (meta weight, accelerate's hook) is refused by name: fastpeft's layer would drop the
    hook and meet the meta weight at the first call."""
    m = Toy()
    q = m.layers[1].attn.q_proj
    q.weight = nn.Parameter(torch.empty_like(q.weight, device="meta"))
    q._hf_hook = object()  # (what accelerate's dispatch leaves on an offloaded module)
    with pytest.raises(ValueError, match=r"'layers.1.attn.q_proj', whose weight accelerate offloads"):
        fastpeft.inject(m, LoraConfig(r=2, target_modules=["q_proj"]))
    assert not adapter_configs(m) and type(m.layers[0].attn.q_proj) is nn.Linear


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_mixed_batch_routes_the_recomputation(reentrant):
    """An activation checkpoint recomputes in backward, inside the mixed_batch block: the LoRA layers and the
    modules_to_save copies route the recomputation as the forward, and each adapter gets its gradients bit for bit.
    (Backward after the block would recompute without the routing: the README says to run it inside.)"""
    from torch.utils.checkpoint import checkpoint

    def grads(ckpt):
        torch.manual_seed(0)
        m = Toy()
        fastpeft.inject(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                        adapter_name="a")
        fastpeft.inject(m, LoraConfig(r=2, target_modules=["q_proj", "mlp.0"], init_lora_weights=False,
                                      modules_to_save=["lm_head"]), adapter_name="b")
        trained = {n: p for n, p in m.named_parameters() if "_adapters." in n or "modules_to_save.b" in n}
        for p in trained.values():  # both adapters train on the mixed batch
            p.requires_grad_(True)
        x = _x().requires_grad_()  # (a reentrant checkpoint needs an input that requires grad)
        with fastpeft.mixed_batch(m, ["b", "a", None]):
            loss = (checkpoint(m, x, use_reentrant=reentrant) if ckpt else m(x)).square().mean()
            loss.backward()
        return {n: p.grad for n, p in trained.items()}
    want, got = grads(False), grads(True)
    assert want.keys() == got.keys() and all(want[n] is not None for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=n)


def test_save_adapter_writes_on_rank_0_alone_by_default(tmp_path, monkeypatch):
    """With a process group, save_adapter's default writes on global rank 0 only (every DDP rank wrote, and their
    atomic renames raced); is_main_process=True writes anyway (fastpeft.hf's temporary folders, on every rank)."""
    m = _lora_model()
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    fastpeft.save_adapter(m, tmp_path / "rank1", "a")
    assert not (tmp_path / "rank1").exists()
    fastpeft.save_adapter(m, tmp_path / "own", "a", is_main_process=True)
    assert (tmp_path / "own" / "adapter_model.safetensors").exists()
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    fastpeft.save_adapter(m, tmp_path / "rank0", "a")
    assert (tmp_path / "rank0" / "adapter_config.json").exists()


def test_base_biases_follow_the_active_adapter():
    """Base biases with two adapters on a LLaMA with biases: the adapter with bias="all" / "lora_only" trains them
    while it is active, as PEFT (the same set), and no other adapter does (PEFT keeps training them while a later
    adapter is active, though only the first one's files hold them); one adapter per model may have a bias setting
    (PEFT's rule), whichever is added first; deleting it freezes them. Before 2026-12-01 an adapter's bias setting
    trained the biases from its inject on, whatever adapter was active, and a later adapter's wrapping froze them."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    base = transformers.LlamaForCausalLM(cfg)

    def trained(m):
        return sorted(n.replace("base_model.model.", "").replace(".base_layer", "") for n, p in m.named_parameters()
                      if p.requires_grad and n.endswith("bias"))
    for bias in ("all", "lora_only"):
        for order in ("biased-first", "biased-second"):
            with_bias = dict(r=4, target_modules=["q_proj"], bias=bias)
            plain = dict(r=2, target_modules=["v_proj", "q_proj"])
            first, second = (with_bias, plain) if order == "biased-first" else (plain, with_bias)
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**with_bias), adapter_name="a")
            ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**first), adapter_name="a")
            fastpeft.inject(ours, LoraConfig(**second), adapter_name="b", activate=False)
            biased = "a" if order == "biased-first" else "b"
            fastpeft.set_adapter(ours, biased)
            assert trained(ours) == trained(theirs) != [], (bias, order)  # PEFT's set, while the adapter is active
            other = "b" if biased == "a" else "a"
            fastpeft.set_adapter(ours, other)
            assert trained(ours) == [], (bias, order)
            with pytest.raises(ValueError, match=f"adapter '{biased}' trains the base biases already"):
                fastpeft.inject(ours, LoraConfig(r=2, target_modules=["k_proj"], bias="all"), adapter_name="c")
            fastpeft.set_adapter(ours, biased)
            fastpeft.delete_adapter(ours, biased)
            assert trained(ours) == []
            fastpeft.inject(ours, LoraConfig(r=2, target_modules=["k_proj"], bias=bias), adapter_name="c")
            assert trained(ours) != []  # (the rule counts the adapters there are)


def test_an_adapter_loaded_frozen_stays_frozen_when_another_is_added(tmp_path):
    """A bias="all" adapter loaded with trainable=False (or inference_mode) stays frozen, biases and factors, when
    another adapter is added beside it inactive (before 2026-12-01 the inject's set_adapter unfroze its factors, and
    the biases with them); inside disable_adapter() the biases stay as trainable as they were (PEFT's)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    base = transformers.LlamaForCausalLM(cfg)
    trained = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "a")
    fastpeft.save_adapter(trained, tmp_path / "a", adapter_name="a")
    for how in ("trainable=False", "inference_mode"):
        if how == "trainable=False":
            model = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "a", "a", trainable=False)
        else:
            model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], bias="all",
                                                                   inference_mode=True), "a")
        assert not [n for n, p in model.named_parameters() if p.requires_grad]
        fastpeft.inject(model, LoraConfig(r=2, target_modules=["v_proj"]), "b", activate=False)
        assert not [n for n, p in model.named_parameters() if p.requires_grad], how
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "a")
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.warns(UserWarning, match="trains biases in place"), fastpeft.disable_adapter(model):
        assert {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")} == \
            {n for n in before if n.endswith("bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before
