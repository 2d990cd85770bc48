"""BitFit, bottleneck adapters, prompt tuning and layer-wise tuning through inject: what trains, the
zero-init invariance, parameter counts, layer-wise learning rates, and adapter-file round trips."""
import copy
import json

import pytest
import torch

import fastpeft
from fastpeft import AdapterConfig, BitFitConfig, LayerwiseConfig, LoraConfig, PromptTuningConfig
from fastpeft.inject import adapter_configs
from fastpeft.io import CONFIG_NAME, WEIGHTS_NAME
from test_inject import Toy

transformers = pytest.importorskip("transformers")


def _bert(seed=0):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_bitfit_trains_biases_only():
    m = Toy()
    x = torch.randn(3, 16)
    y0 = m(x)
    fastpeft.inject(m, BitFitConfig(modules_to_save=["lm_head"]))
    trainable = _trainable(m)
    assert trainable == {n for n, _ in m.named_parameters() if n.endswith(".bias")} | {"lm_head.weight"}
    torch.testing.assert_close(m(x), y0)
    assert fastpeft.trainable_parameters(m)[0] == sum(p.numel() for n, p in m.named_parameters() if n in trainable)


@pytest.mark.parametrize("variant,per_layer", [("pfeiffer", 1), ("houlsby", 2)])
def test_adapters_zero_init_and_placement(variant, per_layer):
    m = _bert()
    ids, mask = _inputs()
    y0 = m(input_ids=ids, attention_mask=mask).last_hidden_state
    fastpeft.inject(m, AdapterConfig(bottleneck_dim=8, variant=variant))
    adapters = [n for n, mod in m.named_modules() if isinstance(mod, fastpeft.BottleneckAdapter)]
    assert len(adapters) == 3 * per_layer
    assert all(n.endswith("output.dense") for n in adapters)
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).last_hidden_state, y0)
    assert all(".adapter_" in n for n in _trainable(m))
    assert fastpeft.trainable_parameters(m)[0] == 3 * per_layer * (2 * 32 * 8 + 8 + 32)
    _perturb(m)
    assert not torch.allclose(m(input_ids=ids, attention_mask=mask).last_hidden_state, y0)


def test_prompt_tuning_prepends_virtual_tokens():
    m = _bert()
    ids, mask = _inputs()
    fastpeft.inject(m, PromptTuningConfig(num_virtual_tokens=4))
    assert _trainable(m) == {"fastpeft_prompt.prompt_embeddings"}
    out = m(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 11, 32)
    # The prompt is what the model sees first: running inputs_embeds by hand gives the same.
    emb = torch.cat([m.fastpeft_prompt.prompt_embeddings.unsqueeze(0).expand(2, -1, -1),
                     m.get_input_embeddings()(ids)], 1)
    m._fastpeft_prompt_hook.remove()
    ref = m(inputs_embeds=emb, attention_mask=torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask], 1))
    torch.testing.assert_close(out, ref.last_hidden_state)


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_prompt_tuning_keeps_every_call_of_the_model_working():
    """"The model is still called as before": a classifier's sequence labels (B,) stay as they are (token
    labels (B, T) get n leading -100), explicit position_ids shift behind the prompt's n positions (the same
    output as the default ones), and generate() with the cache gives the tokens of a greedy loop that runs the
    whole prompted sequence at every step, with and without left padding."""
    torch.manual_seed(0)
    clf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=3)).eval()
    fastpeft.inject(clf, PromptTuningConfig(num_virtual_tokens=4))
    ids, mask = _inputs()
    labels = torch.tensor([0, 2])
    out = clf(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))

    lm = _llama()
    fastpeft.inject(lm, PromptTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        lm.fastpeft_prompt.prompt_embeddings.normal_()  # a prompt that changes what the model says
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    out = lm(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 9, 64)
    logits = out.logits[:, 2:-1].reshape(-1, 64)  # every real token is a target, the first one predicted by the
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, ids.reshape(-1)))  # prompt's last
    torch.testing.assert_close(lm(input_ids=ids, position_ids=torch.arange(6)[None].expand(2, -1)).logits,
                               out.logits)

    def greedy(ids, mask, steps):
        for _ in range(steps):
            nxt = lm(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        return ids

    lm.generation_config.eos_token_id = None  # generate every step, as the loop does
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    for m in (torch.ones_like(ids), mask):
        want = greedy(ids, m, 5)
        for cache in (True, False):
            got = lm.generate(input_ids=ids, attention_mask=m, max_new_tokens=5, do_sample=False, use_cache=cache,
                              pad_token_id=0)
            assert torch.equal(got, want), (cache, got, want)


def test_prompt_text_init():
    m = _bert()

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": [3, 9]}

    fastpeft.inject(m, PromptTuningConfig(num_virtual_tokens=5, init_text="good", tokenizer=tokenizer))
    w = m.get_input_embeddings().weight
    torch.testing.assert_close(m.fastpeft_prompt.prompt_embeddings, w[[3, 9, 3, 9, 3]])
    with pytest.raises(ValueError, match="init_text needs tokenizer"):
        PromptTuningConfig(init_text="x")
    with pytest.raises(ValueError, match="prompt tuning needs a transformers model"):
        fastpeft.inject(Toy(), PromptTuningConfig())


def test_layerwise_last_n_and_pattern_and_param_groups():
    m = _bert()
    fastpeft.inject(m, LayerwiseConfig(train_last_n=2, modules_to_save=["pooler"]))
    trainable = _trainable(m)
    assert trainable and all(n.startswith(("encoder.layer.1.", "encoder.layer.2.", "pooler.")) for n in trainable)
    assert any(n.startswith("encoder.layer.1.") for n in trainable)
    groups = fastpeft.layerwise_param_groups(m, lr=1.0, decay=0.5)
    lrs = sorted(g["lr"] for g in groups)
    assert lrs == [0.5, 1.0]  # layer 1 at lr * 0.5, layer 2 and the pooler at lr
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    m2 = fastpeft.inject(_bert(), LayerwiseConfig(layers_pattern=r"encoder\.layer\.0\.attention"))
    assert all(n.startswith("encoder.layer.0.attention.") for n in _trainable(m2))
    with pytest.raises(ValueError, match="exactly one of train_last_n and layers_pattern"):
        LayerwiseConfig()
    with pytest.raises(ValueError, match="train_last_n=5 but the model has 3 blocks"):
        fastpeft.inject(_bert(), LayerwiseConfig(train_last_n=5))


def test_layerwise_param_groups_put_gpt2_embeddings_below_the_stack():
    """GPT-2's embeddings are wte / wpe (no "embed" in their names): lr * decay ** L, as BERT's and LLaMA's."""
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    m = transformers.GPT2LMHeadModel(cfg)
    groups = fastpeft.layerwise_param_groups(m, lr=1.0, decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(m.transformer.wte.weight)] == lr_of[id(m.transformer.wpe.weight)] == 0.25
    assert lr_of[id(m.transformer.h[0].attn.c_attn.weight)] == 0.5 and lr_of[id(m.transformer.ln_f.weight)] == 1.0


@pytest.mark.parametrize("config", [
    BitFitConfig(), AdapterConfig(bottleneck_dim=4, variant="houlsby"), PromptTuningConfig(num_virtual_tokens=3),
    LayerwiseConfig(train_last_n=1)], ids=["bitfit", "adapters", "prompt", "layerwise"])
def test_method_files_round_trip(tmp_path, config):
    m = fastpeft.inject(_bert(), config)
    _perturb(m)
    ids, mask = _inputs()
    y = m(input_ids=ids, attention_mask=mask).last_hidden_state
    fastpeft.save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == config.peft_type
    if isinstance(config, PromptTuningConfig):
        from safetensors.torch import load_file
        assert set(load_file(tmp_path / WEIGHTS_NAME)) == {"prompt_embeddings"}  # PEFT's key
        assert cfg["num_virtual_tokens"] == 3 and cfg["token_dim"] == 32
    fresh = _bert()
    fastpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).last_hidden_state, y, rtol=0, atol=0)
    assert fastpeft.trainable_parameters(fresh) == fastpeft.trainable_parameters(m)
    fastpeft.load_adapter(fresh, tmp_path)  # over the same adapter again: fine
    wrong = _bert()
    fastpeft.inject(wrong, LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="already has adapter"):
        fastpeft.load_adapter(wrong, tmp_path)


def test_bad_method_configs_and_second_adapter():
    with pytest.raises(ValueError, match="bottleneck_dim must be a positive int"):
        AdapterConfig(bottleneck_dim=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        AdapterConfig(variant="lora")
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="knows no adapter places"):
        fastpeft.inject(Toy(), AdapterConfig())
    m = fastpeft.inject(Toy(), BitFitConfig())
    with pytest.raises(ValueError, match="already has adapter"):
        fastpeft.inject(m, BitFitConfig(), "again")


CONFIGS = {"bitfit": BitFitConfig(), "adapters": AdapterConfig(bottleneck_dim=4, variant="houlsby"),
           "prompt": PromptTuningConfig(num_virtual_tokens=3), "layerwise": LayerwiseConfig(train_last_n=1)}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_switching_off_deleting_and_unloading_the_in_model_methods(kind):
    """These adapters are part of the model itself. ``set_adapter(None)`` cannot switch them off (it used to
    report "base model" while the prompt / adapters still ran and trained); ``delete_adapter`` takes a prompt or
    bottleneck adapters out (the base model's outputs again, bit for bit) and refuses BitFit / layer-wise (there is
    no base to go back to); ``merge_and_unload`` keeps BitFit / layer-wise as the model's weights and refuses a
    prompt / adapters. Every refusal leaves the model as it was."""
    ids, mask = _inputs()
    base = _bert()
    want = base(input_ids=ids, attention_mask=mask).last_hidden_state
    m = fastpeft.inject(_bert(), CONFIGS[kind])
    _perturb(m)
    trained = m(input_ids=ids, attention_mask=mask).last_hidden_state
    trainable = _trainable(m)
    with pytest.raises(ValueError, match="part of the model itself: it cannot be switched off"):
        fastpeft.set_adapter(m, None)
    removable = kind in ("adapters", "prompt")
    if removable:
        with pytest.raises(ValueError, match="does not fold into the base weights"):
            fastpeft.merge_and_unload(m)
    else:
        with pytest.raises(ValueError, match="trained the model's own tensors"):
            fastpeft.delete_adapter(m, "default")
    assert fastpeft.active_adapter(m) == "default" and _trainable(m) == trainable
    torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).last_hidden_state, trained, rtol=0, atol=0)
    if removable:
        fastpeft.delete_adapter(m, "default")
        assert not adapter_configs(m) and fastpeft.trainable_parameters(m)[0] == 0
        torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).last_hidden_state, want, rtol=0, atol=0)
        assert [type(x) for x in m.modules()] == [type(x) for x in base.modules()]
        fastpeft.inject(m, CONFIGS[kind])  # a new one goes in as on a fresh model (no second prompt stacked)
        assert m(input_ids=ids, attention_mask=mask).last_hidden_state.shape == trained.shape
    else:
        fastpeft.merge_and_unload(m)
        torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).last_hidden_state, trained, rtol=0, atol=0)


def test_tied_lm_head_in_modules_to_save():
    """A causal LM with tied embeddings: ``lm_head.weight`` is an alias ``named_parameters()`` drops; a method
    saving lm_head (or layer-wise on it) used to raise KeyError halfway through inject, the model half-changed."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    for config in (PromptTuningConfig(num_virtual_tokens=2, modules_to_save=["lm_head"]),
                   BitFitConfig(modules_to_save=["lm_head"]), LayerwiseConfig(layers_pattern="lm_head")):
        torch.manual_seed(0)
        m = fastpeft.inject(transformers.LlamaForCausalLM(cfg), config)
        assert _trainable(m), type(config).__name__
        ids = torch.randint(0, 64, (1, 5))
        m(input_ids=ids, labels=ids).loss.backward()


def _classifier(labels=3):
    """A 2-layer BERT sequence classifier, in eval mode, seed 0."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, num_labels=labels)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_prompt_tuning_files_go_both_ways_with_peft(tmp_path):
    """fastpeft's prompt-tuning files name the task type PEFT needs (task_type None built a plain PeftModel, which
    ran the base model: other outputs, no error) and use PEFT's prompt-learning key prefix ``base_model.`` for the
    saved modules (a classifier); PEFT's files load here, the SEQ_CLS one with its classifier."""
    peft = pytest.importorskip("peft")
    base = _classifier()
    ids, mask = _inputs()
    m = fastpeft.inject(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=4, modules_to_save=["classifier"]))
    _perturb(m)
    m.eval()
    fastpeft.save_adapter(m, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["task_type"] == "SEQ_CLS"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    with torch.no_grad():
        want = m(input_ids=ids, attention_mask=mask).logits
        assert (want - base(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, want)
    theirs.save_pretrained(tmp_path / "peft")  # and PEFT's own file, classifier included, loads here
    back = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, want)


def test_prompt_file_of_a_classifier_without_modules_to_save_loads_in_peft_and_resumes(tmp_path):
    """PEFT's SEQ_CLS model wraps the classifier and asks for its weights in the file: fastpeft's file holds them
    even where the prompt alone trains (before 2026-12-01 PEFT raised KeyError 'base_model.classifier.weight').
    The file's tensors also go back through the model's load_state_dict (Trainer's resume; before, PyTorch's own
    method took them as unexpected keys and restored nothing)."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    base = _classifier()
    ids, mask = _inputs()
    m = fastpeft.inject(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=4))
    assert _trainable(m) == {"fastpeft_prompt.prompt_embeddings"}
    _perturb(m)
    m.eval()
    fastpeft.save_adapter(m, tmp_path)
    assert {"base_model.classifier.weight", "prompt_embeddings"} <= set(load_file(tmp_path / WEIGHTS_NAME))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    back = fastpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        want = m(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, want)
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=0)
        m.fastpeft_prompt.prompt_embeddings.zero_()
    result = m.load_state_dict(load_file(tmp_path / WEIGHTS_NAME), False)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["pfeiffer", "houlsby"])
def test_adapters_after_gpt2_conv1d_projections(variant):
    """GPT-2's projections are transformers Conv1D layers (width ``nf``, no ``out_features``): the built-in places
    for model type gpt2 take bottleneck adapters, zero-initialised (the model's outputs unchanged), and train."""
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    want = base(input_ids=ids).logits
    m = fastpeft.inject(copy.deepcopy(base), AdapterConfig(bottleneck_dim=4, variant=variant))
    torch.testing.assert_close(m(input_ids=ids).logits, want, rtol=0, atol=0)
    per_place = 2 * 4 * 32 + 4 + 32
    assert fastpeft.trainable_parameters(m)[0] == per_place * 2 * (2 if variant == "houlsby" else 1)
    m(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_layerwise_last_n_on_an_encoder_decoder_asks_which_stack():
    """T5's encoder.block and decoder.block are equally long: "the last n blocks" could be either (it silently took
    the encoder's); refused, naming both, the model unchanged."""
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)
    m = transformers.T5ForConditionalGeneration(cfg)
    flags = [p.requires_grad for p in m.parameters()]
    with pytest.raises(ValueError,
                       match="several stacks of 2 blocks .*'encoder.block', 'decoder.block'.*layers_pattern"):
        fastpeft.inject(m, LayerwiseConfig(train_last_n=1))
    assert [p.requires_grad for p in m.parameters()] == flags
    fastpeft.inject(m, LayerwiseConfig(layers_pattern=r"decoder\.block\.1"))
    assert {n.split(".")[0] for n in _trainable(m)} == {"decoder"}


def test_deleting_a_prompt_with_modules_to_save_is_refused():
    """A prompt (or adapters) whose modules_to_save trained in place (a classifier): delete_adapter would leave the
    trained head behind (0.23 off the base), so it refuses, naming them, before anything changes."""
    m = fastpeft.inject(_classifier(), PromptTuningConfig(num_virtual_tokens=2, modules_to_save=["classifier"]))
    trainable = _trainable(m)
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\] in place"):
        fastpeft.delete_adapter(m, "default")
    assert _trainable(m) == trainable and hasattr(m, "fastpeft_prompt") and adapter_configs(m)


def test_prompt_files_of_gpt2_and_of_a_model_under_model():
    """GPT-2's LM head class is a causal LM for PEFT (task type from transformers' auto classes, not a name suffix:
    FEATURE_EXTRACTION made PEFT's generate() drop the prompt); a Llama's saved modules sit under ``model.``,
    which PEFT's prompt prefix ``base_model.`` must not be confused with LoRA's ``base_model.model.``."""
    peft = pytest.importorskip("peft")
    import tempfile

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1,
                                                                n_head=4))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    ids = torch.randint(0, 50, (1, 6))
    for base, saved in ((gpt2, None), (llama, ["model.norm"])):
        m = fastpeft.inject(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=3, modules_to_save=saved))
        _perturb(m)
        m.eval()
        with tempfile.TemporaryDirectory() as d:
            fastpeft.save_adapter(m, d)
            assert json.load(open(f"{d}/{CONFIG_NAME}"))["task_type"] == "CAUSAL_LM"
            back = fastpeft.load_adapter(copy.deepcopy(base), d).eval()
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
            with torch.no_grad():
                want = m(input_ids=ids).logits
                torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=0, atol=0)
                torch.testing.assert_close(theirs(input_ids=ids).logits, want)


def test_prompt_file_with_another_task_head_is_refused_before_anything_changes(tmp_path):
    """A SEQ_CLS prompt file holds its classifier: one of another label count is refused naming the key and both
    shapes, before the prompt is injected (it raised torch's size error with the prompt already in)."""
    fastpeft.save_adapter(fastpeft.inject(_classifier(3), PromptTuningConfig(num_virtual_tokens=2)), tmp_path)
    m = _classifier(2)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"'classifier\.\w+' must have shape \(2.*\) for this model, got \(3"):
        fastpeft.load_adapter(m, tmp_path)
    assert not adapter_configs(m) and not hasattr(m, "fastpeft_prompt")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
