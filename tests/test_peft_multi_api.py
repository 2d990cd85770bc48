"""PEFT's ways of using several adapters, on models prepared by fastpeft: ``adapter_names=[...]`` in a forward and in
``generate`` (``"__base__"`` for base rows), ``disable_adapter()``, and a mixed training batch that leaves the
adapters it does not route untouched (no gradient, so the optimizer does not move them)."""
import copy

import pytest
import torch

import fastpeft
from fastpeft import LoraConfig
from fastpeft.inject import peft_state
from test_inject import Toy

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def llama_pair(tmp_path):
    """A PEFT model with adapters "default" (r 4) and "b" (r 8), and the same adapters loaded by fastpeft."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(r=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(20)  # each adapter changes the greedy tokens
    pm.save_pretrained(tmp_path)
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    fastpeft.load_adapter(fm, tmp_path / "b", adapter_name="b")
    return base, pm.eval(), fm.eval()


IDS = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(1))
NAMES = ["default", "b", "__base__"]


def test_forward_adapter_names_as_peft(tmp_path):
    base, pm, fm = llama_pair(tmp_path)
    with torch.no_grad():
        theirs = pm(input_ids=IDS, adapter_names=NAMES).logits
        ours = fm(input_ids=IDS, adapter_names=NAMES).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[2], base(input_ids=IDS).logits[2], rtol=0, atol=0)
        assert (ours[0] - ours[1]).abs().max() > 1e-2  # before 2026-12-01 every row ran the active adapter
        # after the call the active adapter applies again, on every row
        torch.testing.assert_close(fm(input_ids=IDS).logits[1], pm(input_ids=IDS).logits[1], rtol=1e-5, atol=1e-5)


def test_generate_adapter_names_as_peft_and_with_beams(tmp_path):
    base, pm, fm = llama_pair(tmp_path)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(IDS))
    with torch.no_grad():
        ours = fm.generate(input_ids=IDS, adapter_names=NAMES, **kw)
        assert torch.equal(ours, pm.generate(input_ids=IDS, adapter_names=NAMES, **kw))
        # beams: the names follow generate's num_beams rows of each sequence
        beams = fm.generate(input_ids=IDS, adapter_names=NAMES, num_beams=2, **kw)
        for i, name in enumerate(NAMES):
            fastpeft.set_adapter(fm, None if name == "__base__" else name)
            alone = fm.generate(input_ids=IDS[i:i + 1], num_beams=2, **{**kw, "attention_mask": kw[
                "attention_mask"][i:i + 1]})
            assert torch.equal(beams[i:i + 1], alone), name


def test_a_failing_forward_leaves_no_routing(tmp_path):
    _, _, fm = llama_pair(tmp_path)
    q = fm.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"adapter_names \['x'\] are not adapters"):
        fm(input_ids=IDS, adapter_names=["x", "b", None])
    with pytest.raises(ValueError, match="input batch has 3 sequences"):  # two names for three sequences
        fm(input_ids=IDS, adapter_names=["b", None])
    assert q.routing is None and peft_state(fm).routing is None
    with torch.no_grad():
        torch.testing.assert_close(fm(input_ids=IDS, adapter_names=None).logits, fm(input_ids=IDS).logits)


def test_disable_adapter_runs_the_base_for_every_row(tmp_path):
    base, pm, fm = llama_pair(tmp_path)
    want = base(input_ids=IDS).logits.detach()
    with torch.no_grad(), fastpeft.mixed_batch(fm, ["b", "default", None]):
        routed = fm(input_ids=IDS).logits
        with fastpeft.disable_adapter(fm):
            assert fastpeft.active_adapter(fm) is None
            torch.testing.assert_close(fm(input_ids=IDS).logits, want, rtol=0, atol=0)
            torch.testing.assert_close(fm(input_ids=IDS, adapter_names=NAMES).logits, want, rtol=0, atol=0)
            with pm.disable_adapter():  # PEFT's: the same
                torch.testing.assert_close(pm(input_ids=IDS, adapter_names=NAMES).logits, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fm(input_ids=IDS).logits, routed, rtol=0, atol=0)  # the routing is back
    assert fastpeft.active_adapter(fm) == "default"
    with pytest.raises(KeyError), fastpeft.disable_adapter(fm):  # an exception inside: everything comes back too
        raise KeyError("boom")
    with torch.no_grad():
        torch.testing.assert_close(fm(input_ids=IDS).logits, pm(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_disable_adapter_refuses_an_adapter_that_is_part_of_the_model():
    model = fastpeft.inject(Toy(), fastpeft.BitFitConfig())
    with pytest.raises(ValueError, match="part of the model itself"):
        with fastpeft.disable_adapter(model):
            pass


def test_to_peft_takes_adapter_names_from_there(tmp_path):
    _, pm, fm = llama_pair(tmp_path)
    with torch.no_grad():
        want = fm(input_ids=IDS, adapter_names=NAMES).logits
    converted = fastpeft.to_peft(fm).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=IDS, adapter_names=NAMES).logits, want, rtol=1e-5, atol=1e-5)
    assert not converted.base_model.model._forward_pre_hooks  # fastpeft's hooks went with its layers


def test_mixed_batch_training_leaves_unrouted_adapters_without_gradients():
    """An adapter no sequence of a training batch routes to gets no gradient (None, as a PEFT adapter that did not
    run), so AdamW's weight decay and momentum do not move it; before 2026-12-01 it got zeros and moved."""
    torch.manual_seed(0)
    model = Toy()
    for name in ("a", "b", "c"):
        fastpeft.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), name)
    params = {name: [p for layer in fastpeft.lora_layers(model).values() for p in layer.adapter_parameters(name)]
              for name in ("a", "b", "c")}
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    before = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
    opt = torch.optim.AdamW([p for ps in params.values() for p in ps], lr=1e-2, weight_decay=0.1)
    model.train()
    with fastpeft.mixed_batch(model, ["a", None, "c"]):
        model(torch.randn(3, 4, 16)).square().mean().backward()
    assert all(p.grad is None for p in params["b"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params["a"] + params["c"])
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params["b"], before["b"]))
    assert not any(torch.equal(p, q) for p, q in zip(params["a"], before["a"]))


MERGES = [("cat", 8, {}), ("svd", 8, {}), ("linear", 4, {}), ("ties", 4, dict(density=0.5)),
          ("ties", 4, dict(density=0.3, majority_sign_method="frequency")), ("dare_linear", 4, dict(density=0.6)),
          ("dare_ties", 4, dict(density=0.6)), ("magnitude_prune", 4, dict(density=0.4)),
          ("ties_svd", 8, dict(density=0.5)), ("dare_linear_svd", 8, dict(density=0.7)),
          ("dare_ties_svd", 4, dict(density=0.7, majority_sign_method="frequency")),
          ("magnitude_prune_svd", 8, dict(density=0.5))]


@pytest.mark.parametrize("how, rank_b, kw", MERGES, ids=[f"{h}-{r}-{'-'.join(map(str, k.values()))}"
                                                          for h, r, k in MERGES])
def test_add_weighted_adapter_as_peft(tmp_path, how, rank_b, kw):
    """PEFT's add_weighted_adapter, every combination type, on the same adapters (one also on the embeddings, the
    other on other layers, negative weight): the new adapter's logits equal PEFT's, and its file loads in PEFT. The
    dare types draw at random: under the same seed, the same draws as PEFT (before 2026-12-01 only cat, svd and
    linear were implemented)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(r=rank_b, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                        init_lora_weights=False))
    pm.save_pretrained(tmp_path / "two")
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "two")
    fastpeft.load_adapter(fm, tmp_path / "two" / "b", adapter_name="b")
    torch.manual_seed(5)
    pm.add_weighted_adapter(["default", "b"], [0.7, -1.3], "m", combination_type=how, **kw)
    torch.manual_seed(5)
    fastpeft.add_weighted_adapter(fm, ["default", "b"], [0.7, -1.3], "m", combination_type=how, **kw)
    assert fastpeft.active_adapter(fm) == "default"  # added inactive and frozen, as PEFT's
    assert not any(p.requires_grad for layer in fastpeft.lora_layers(fm).values() if "m" in layer.adapter_names
                   for p in layer.adapter_parameters("m"))
    pm.set_adapter("m")
    fastpeft.set_adapter(fm, "m")
    with torch.no_grad():
        ours = fm.eval()(input_ids=IDS).logits
        torch.testing.assert_close(ours, pm.eval()(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
        assert (ours - base(input_ids=IDS).logits).abs().max() > 0.1
    fastpeft.save_adapter(fm, tmp_path / "m", "m")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, ours, rtol=1e-5, atol=1e-5)


def test_add_weighted_adapter_refusals_change_nothing(tmp_path):
    _, _, fm = llama_pair(tmp_path)
    for call, exc, match in [
        (lambda: fastpeft.add_weighted_adapter(fm, ["default", "b"], [1.0, 1.0], "m", "linear"), ValueError,
         r"'linear' needs adapters of one rank, got \{'default': 4, 'b': 8\}"),
        (lambda: fastpeft.add_weighted_adapter(fm, ["default", "zz"], [1.0, 1.0], "m"), ValueError, "'zz'"),
        (lambda: fastpeft.add_weighted_adapter(fm, ["default", "b"], [1.0], "m"), ValueError, "one number per adapter"),
        (lambda: fastpeft.add_weighted_adapter(fm, ["default"], [1.0], "b"), ValueError, "'b' already exists"),
        (lambda: fastpeft.add_weighted_adapter(fm, ["default", "b"], [1.0, 2.0], "m", "ties", density=0.5),
         ValueError, r"'ties' needs adapters of one rank"),
    ]:
        with pytest.raises(exc, match=match):
            call()
        assert "m" not in peft_state(fm).adapters and fm.model.layers[0].self_attn.q_proj.adapter_names == [
            "default", "b"]


def test_adapter_names_in_training_mode_is_refused_as_peft(tmp_path):
    """The forward's block closes when it returns, so an activation checkpoint recomputed in backward would run the
    active adapter (its gradients went to the wrong adapter): refused in training, pointing to mixed_batch."""
    _, _, fm = llama_pair(tmp_path)
    fm.train()
    with pytest.raises(ValueError, match=r"eval mode only.*fastpeft.mixed_batch"):
        fm(input_ids=IDS, adapter_names=NAMES)
    assert fm.model.layers[0].self_attn.q_proj.routing is None
    fm(input_ids=IDS, adapter_names=None)  # None is fine in training


def test_disable_adapter_warns_for_trained_biases_and_hides_no_deletion(tmp_path):
    _, _, fm = llama_pair(tmp_path)
    with fastpeft.mixed_batch(fm, ["default", "b", None]), fastpeft.disable_adapter(fm):
        with pytest.raises(RuntimeError, match=r"delete_adapter\('b'\) inside a mixed_batch block"):
            fastpeft.delete_adapter(fm, "b")  # the outer block still routes it
    model = fastpeft.inject(Toy(), LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    with pytest.warns(UserWarning, match="trains biases in place"), fastpeft.disable_adapter(model):
        pass


@pytest.mark.parametrize("how", ["svd", "cat"])
def test_add_weighted_adapter_ranks_follow_peft_with_rank_pattern(tmp_path, how):
    """PEFT's rank of an adapter is max(r, rank_pattern's), so the new adapter's rank is 8 (svd) / 16 (cat) here,
    and layers whose adapters are narrower are zero-padded; before the fix fastpeft took 4 / 8 (svd logits 0.14 off)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg).eval()
    kw = dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4, "v_proj": 4},
              init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    pm.add_adapter("b", peft.LoraConfig(**kw))
    pm.save_pretrained(tmp_path)
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    fastpeft.load_adapter(fm, tmp_path / "b", adapter_name="b")
    pm.add_weighted_adapter(["default", "b"], [0.5, 0.8], "m", combination_type=how)
    fastpeft.add_weighted_adapter(fm, ["default", "b"], [0.5, 0.8], "m", combination_type=how)
    q = fm.model.layers[0].self_attn.q_proj
    assert q.adapter_spec("m").r == pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["m"].weight.shape[0]
    pm.set_adapter("m")
    fastpeft.set_adapter(fm, "m")
    with torch.no_grad():
        torch.testing.assert_close(fm.eval()(input_ids=IDS).logits, pm.eval()(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)


def test_generate_adapter_names_with_sampled_copies(tmp_path):
    """Sampling with num_return_sequences=k: the names follow generate's k copies of each sequence, as
    mixed_batch(rows_per_sequence=k) routes them (PEFT itself raises here)."""
    _, _, fm = llama_pair(tmp_path)
    kw = dict(max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=0,
              attention_mask=torch.ones_like(IDS))
    with torch.no_grad():
        torch.manual_seed(7)
        ours = fm.generate(input_ids=IDS, adapter_names=NAMES, **kw)
        torch.manual_seed(7)
        with fastpeft.mixed_batch(fm, ["default", "b", None], rows_per_sequence=2):
            want = fm.generate(input_ids=IDS, **kw)
    assert ours.shape[0] == 6 and torch.equal(ours, want)


def _weighted_pair(tmp_path, first: dict, second: dict, dtype=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **first))
    pm.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **second))
    pm.save_pretrained(tmp_path / "two")
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "two")
    fastpeft.load_adapter(fm, tmp_path / "two" / "b", adapter_name="b")
    if dtype is not None:
        pm, fm = pm.to(dtype), fm.to(dtype)
    return pm, fm


@pytest.mark.parametrize("case", ["bf16-adapters", "first-adapter-layers", "svd-clamp", "one-adapter-ties"])
def test_add_weighted_adapter_follows_peft_step_for_step(tmp_path, case):
    """What a review found off PEFT (2026-12-01): bf16 adapters (PEFT prunes them in bf16, density rounded to bf16
    too: fastpeft pruned fp32 copies, ΔW up to 0.48 off), the first adapter's layers_to_transform (PEFT's new config
    keeps it: the new adapter only on the layers it lets through; logits 0.42 off), svd_clamp (PEFT's task
    arithmetic, whose last bits can flip an SVD sign: 0.19 off), one adapter with a pruning type (PEFT merges it
    linearly and reads no density: fastpeft refused). Logits and the generator state afterwards equal PEFT's."""
    two = dict(r=4, target_modules=["q_proj", "v_proj"])
    first, second, kw, dtype = dict(two), dict(two), {}, None
    adapters, weights = ["default", "b"], [0.7, -1.3]
    if case == "bf16-adapters":
        dtype, kw = torch.bfloat16, dict(combination_type="dare_ties_svd", density=0.6)
    elif case == "first-adapter-layers":
        first.update(target_modules=["q_proj"], layers_to_transform=[0])
        kw = dict(combination_type="dare_linear", density=0.6)
    elif case == "svd-clamp":
        kw = dict(combination_type="svd", svd_clamp=0.9)
    else:
        adapters, weights, kw = ["b"], [0.8], dict(combination_type="ties")
    pm, fm = _weighted_pair(tmp_path, first, second, dtype)
    torch.manual_seed(5)
    pm.add_weighted_adapter(adapters, weights, "m", **kw)
    after_peft = torch.rand(3)
    torch.manual_seed(5)
    fastpeft.add_weighted_adapter(fm, adapters, weights, "m", **kw)
    assert torch.equal(torch.rand(3), after_peft)
    theirs = sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "m" in m.lora_A)
    assert sorted(n for n, layer in fastpeft.lora_layers(fm).items() if "m" in layer.adapter_names) == theirs
    pm.set_adapter("m")
    fastpeft.set_adapter(fm, "m")
    tol = 2e-2 if dtype is not None else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(fm.eval()(input_ids=IDS).logits, pm.eval()(input_ids=IDS).logits, rtol=tol,
                                   atol=tol)
