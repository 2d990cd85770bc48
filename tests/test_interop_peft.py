"""Interop with Hugging Face PEFT, both ways: an adapter PEFT saves loads here and gives PEFT's outputs, an
adapter saved here loads in PEFT and gives ours; and the two write the same tensor keys and shapes.

Every adapter is built with ``init_lora_weights=False`` (non-zero B) and every trainable parameter is then
perturbed (biases, modules_to_save copies), so a dropped or misnamed tensor changes the outputs. The
trainable parameter counts of the two libraries are compared too: perturbing "what is trainable" only
tests the files if both agree on what that is.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import fastpeft  # noqa: E402

# PEFT calls a transformers API that transformers deprecates; nothing fastpeft can act on.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RTOL, ATOL = 1e-5, 1e-5  # fp32, same math in a different order: a dropped tensor is off by ~1e-1


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d=20, hidden=24):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)  # its bias is a non-Linear bias that bias="all" trains
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))  # mlp.0, mlp.2

    def forward(self, h):
        h = h + self.out(torch.tanh(self.q_proj(h)) * self.v_proj(h))
        return h + self.mlp(self.norm(h))


class Toy(nn.Module):
    """Named linears at several depths, one nested in an nn.Sequential, a head, and (as T5 has) an
    embedding whose name contains "bias" but which is no bias term."""

    def __init__(self, d_in=12, d=20, n_out=5, seq=7):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.relative_attention_bias = nn.Embedding(seq, 1)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        pos = torch.arange(x.shape[-2], device=x.device)
        h = self.inp(x) + self.relative_attention_bias(pos)
        for block in self.blocks:
            h = block(h)
        return self.head(F.gelu(h))


def toy_base():
    torch.manual_seed(0)
    return Toy().eval()


def toy_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 7, 12, generator=g)


# (id, kwargs shared verbatim by peft.LoraConfig and fastpeft.LoraConfig)
TOY_CASES = [
    ("list-r4-a8", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "mlp.0"])),
    ("list-r5-a12.5-dropout0.1", dict(r=5, lora_alpha=12.5, lora_dropout=0.1,
                                      target_modules=["q_proj", "blocks.1.out", "inp"])),
    ("rslora-r8-a16", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "mlp.2"])),
    ("rank_pattern-alpha_pattern", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "out", "mlp.0", "mlp.2"],
        rank_pattern={"v_proj": 2, r"blocks\.1\.mlp\.0": 7}, alpha_pattern={"q_proj": 3, "out": 32})),
    ("rslora-rank_pattern-alpha_pattern", dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "mlp.0"],
        rank_pattern={r"blocks\.0\.q_proj": 6}, alpha_pattern={"mlp.0": 5})),
    ("bias-lora_only", dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["q_proj", "v_proj", "mlp.2"])),
    ("bias-all", dict(r=4, lora_alpha=8, bias="all", target_modules=["q_proj", "mlp.0"])),
    ("modules_to_save-head", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                  modules_to_save=["head"])),
    ("modules_to_save-head-bias-lora_only", dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["out"],
                                                 modules_to_save=["head"])),
    ("modules_to_save-head-bias-all", dict(r=4, lora_alpha=8, bias="all", target_modules=["q_proj"],
                                           modules_to_save=["head"])),
    ("regex", dict(r=4, lora_alpha=8, target_modules=r"blocks\.\d\.(q_proj|mlp\.2)")),
    ("regex-one-block", dict(r=3, lora_alpha=6, target_modules=r".*1\.(out|v_proj)")),
    # A plain nn.Module has no get_output_embeddings: PEFT and fastpeft both adapt its head too.
    ("all-linear", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("exclude-list", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "out"],
                          exclude_modules=["blocks.1.v_proj"])),
    ("exclude-regex-all-linear", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                      exclude_modules=r"blocks\.0\..*")),
    # PEFT's block filter: the suffix matches under blocks.1 only; "inp" is named in full, so it stays
    ("layers_to_transform-pattern", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "mlp.0", "inp"],
                                         layers_to_transform=[1], layers_pattern="blocks")),
    ("layers_to_transform-int-pattern-list", dict(r=3, lora_alpha=6, target_modules=["out", "mlp.2"],
                                                  layers_to_transform=0, layers_pattern=["layers", "blocks"])),
]
TOY_IDS = [c[0] for c in TOY_CASES]


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def peft_model(base, kwargs, seed=2):
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs, init_lora_weights=False))
    perturb_trainable(model, seed)
    return model.eval()


def fast_model(base, kwargs, seed=3):
    torch.manual_seed(seed)
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(**kwargs, init_lora_weights=False))
    perturb_trainable(model, seed)
    return model.eval()


@torch.no_grad()
def perturb_trainable(model, seed):
    """Move every trainable parameter (LoRA, trained biases, modules_to_save copies) off its initial value."""
    g = torch.Generator().manual_seed(seed + 100)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "nothing is trainable"
    for p in trainable:
        p.add_(0.2 * torch.randn(p.shape, generator=g))


def peft_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def saved_shapes(directory):
    tensors = safetensors_torch.load_file(str(directory / "adapter_model.safetensors"))
    return {k: tuple(v.shape) for k, v in tensors.items()}


def peft_saved_shapes(directory):
    """PEFT's file, less the duplicates its ``bias="all"`` writes from inside a modules_to_save wrapper:
    ``<m>.original_module.bias`` (the frozen base bias) and ``<m>.modules_to_save.bias`` (the trained copy's,
    which it writes again as ``<m>.bias``, the key that loads). fastpeft writes the latter only."""
    shapes = saved_shapes(directory)
    dup = {k for k in shapes if ".original_module." in k or ".modules_to_save." in k}
    assert all(k.endswith(".bias") for k in dup), f"PEFT wrote unexpected wrapper keys {sorted(dup)}"
    return {k: v for k, v in shapes.items() if k not in dup}


def assert_same_keys(ours, theirs):
    assert sorted(ours) == sorted(theirs), (
        f"only fastpeft: {sorted(set(ours) - set(theirs))}, only PEFT: {sorted(set(theirs) - set(ours))}")
    assert ours == theirs, {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}


def assert_outputs_match(actual, expected, base_out):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    # The adapter must matter, or the comparison above proves nothing.
    assert (expected - base_out).abs().max() > 1e-2


def is_lora(module):
    return isinstance(module, (fastpeft.FastLoRALinear, peft.tuners.lora.LoraLayer))


def peft_targets(pm):
    """Names (relative to the base model) of the layers PEFT adapted."""
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


# ---------------------------------------------------------------------------------------------------------
# 1. Toy model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [c[1] for c in TOY_CASES], ids=TOY_IDS)
def test_toy_peft_to_fastpeft(tmp_path, kwargs):
    base, x = toy_base(), toy_input()
    pm = peft_model(base, kwargs)
    pm.save_pretrained(tmp_path)

    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()

    assert fastpeft.trainable_parameters(fm)[0] == peft_trainable(pm)
    assert set(fastpeft.lora_layers(fm)) == peft_targets(pm)
    with torch.no_grad():
        assert_outputs_match(fm(x), pm(x), base(x))


@pytest.mark.parametrize("kwargs", [c[1] for c in TOY_CASES], ids=TOY_IDS)
def test_toy_peft_to_fastpeft_over_existing_adapter(tmp_path, kwargs):
    """Loading onto a model that already has the adapter (same config, other weights) replaces its weights."""
    base, x = toy_base(), toy_input()
    pm = peft_model(base, kwargs)
    pm.save_pretrained(tmp_path)
    fm = fast_model(base, kwargs)

    fastpeft.load_adapter(fm, tmp_path)

    with torch.no_grad():
        assert_outputs_match(fm.eval()(x), pm(x), base(x))


@pytest.mark.parametrize("kwargs", [c[1] for c in TOY_CASES], ids=TOY_IDS)
def test_toy_fastpeft_to_peft(tmp_path, kwargs):
    base, x = toy_base(), toy_input()
    fm = fast_model(base, kwargs)
    fastpeft.save_adapter(fm, tmp_path)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()

    assert peft_targets(pm) == set(fastpeft.lora_layers(fm))
    with torch.no_grad():
        assert_outputs_match(pm(x), fm(x), base(x))


@pytest.mark.parametrize("kwargs", [c[1] for c in TOY_CASES], ids=TOY_IDS)
def test_toy_same_trainable_parameters(kwargs):
    base = toy_base()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    fm = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(**kwargs))
    assert fastpeft.trainable_parameters(fm)[0] == peft_trainable(pm)


# ---------------------------------------------------------------------------------------------------------
# 3. The files themselves
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [c[1] for c in TOY_CASES], ids=TOY_IDS)
def test_toy_saved_keys_match_peft(tmp_path, kwargs):
    base = toy_base()
    peft_model(base, kwargs).save_pretrained(tmp_path / "peft")
    fastpeft.save_adapter(fast_model(base, kwargs), tmp_path / "fastpeft")
    ours, theirs = saved_shapes(tmp_path / "fastpeft"), peft_saved_shapes(tmp_path / "peft")
    assert_same_keys(ours, theirs)


def test_fastpeft_file_names_resolved_targets(tmp_path):
    """The config written here names the adapted layers in full, so PEFT adapts exactly those."""
    base = toy_base()
    fm = fast_model(base, dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|mlp\.0)",
                               exclude_modules=["blocks.0.mlp.0"]))
    fastpeft.save_adapter(fm, tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert config.peft_type == peft.PeftType.LORA
    assert set(config.target_modules) == {"blocks.0.q_proj", "blocks.1.q_proj", "blocks.1.mlp.0"}


# ---------------------------------------------------------------------------------------------------------
# 2. Small transformers models built from configs (no downloads)
# ---------------------------------------------------------------------------------------------------------
def llama_base():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def falcon_base():
    """Falcon: every projection a FalconLinear, an nn.Linear subclass whose own forward computes x W^T + b."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       new_decoder_architecture=False, multi_query=True)
    return transformers.FalconForCausalLM(config).eval()


def bert_cls_base():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def bert_base():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def hf_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row: the attention mask is passed through unchanged
    return dict(input_ids=ids, attention_mask=mask)


def llama_out(model):
    return model(**hf_inputs()).logits


def bert_cls_out(model):
    return model(**hf_inputs()).logits


def bert_out(model):
    return model(**hf_inputs()).last_hidden_state


# (id, base builder, output getter, shared LoraConfig kwargs, a module that must not be adapted or None)
HF_CASES = [
    ("llama-q_proj-v_proj", llama_base, llama_out, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
     None),
    ("llama-all-linear-rslora", llama_base, llama_out, dict(r=4, lora_alpha=16, use_rslora=True,
                                                            target_modules="all-linear"), "lm_head"),
    ("llama-all-linear-rank_pattern", llama_base, llama_out,
     dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 2},
          alpha_pattern={r"layers\.1\.self_attn\.o_proj": 3}), "lm_head"),
    ("falcon-query_key_value-dense", falcon_base, llama_out, dict(r=4, lora_alpha=8,
                                                                  target_modules=["query_key_value", "dense"]), None),
    ("bert-cls-query-value-modules_to_save-classifier", bert_cls_base, bert_cls_out,
     dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]), None),
    # PEFT's task type: the classifier is trained and saved whole (modules_to_save), never adapted
    ("bert-cls-all-linear-task_type-SEQ_CLS", bert_cls_base, bert_cls_out,
     dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"), "classifier"),
    ("bert-all-linear-bias-all", bert_base, bert_out, dict(r=4, lora_alpha=8, target_modules="all-linear",
                                                          bias="all"), None),
    # without layers_pattern, the first "<name>.<i>." after some prefix: model.layers.1 / encoder.layer.0
    ("llama-layers_to_transform", llama_base, llama_out,
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
     "layers.0.self_attn.q_proj"),
    ("bert-layers_to_transform-pattern", bert_base, bert_out,
     dict(r=4, lora_alpha=8, target_modules=["query", "dense"], layers_to_transform=0, layers_pattern="layer"),
     "layer.1.attention.self.query"),
    ("bert-regex-bias-lora_only", bert_base, bert_out,
     dict(r=2, lora_alpha=4, target_modules=r".*layer\.\d\.attention\.self\.(key|value)", bias="lora_only"),
     None),
]
HF_IDS = [c[0] for c in HF_CASES]


def check_not_adapted(model, name):
    """Module ``name`` (e.g. the LM head, which "all-linear" leaves out) exists and has no LoRA."""
    if name is None:
        return
    found = [(n, m) for n, m in model.named_modules() if n == name or n.endswith("." + name)]
    assert found, f"no module {name!r}"
    for n, m in found:
        assert not is_lora(m), f"{n} must not be adapted"


@pytest.mark.parametrize("build, output, kwargs, not_adapted", [c[1:] for c in HF_CASES], ids=HF_IDS)
def test_transformers_peft_to_fastpeft(tmp_path, build, output, kwargs, not_adapted):
    base = build()
    pm = peft_model(base, kwargs)
    pm.save_pretrained(tmp_path)

    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()

    check_not_adapted(fm, not_adapted)
    assert set(fastpeft.lora_layers(fm)) == peft_targets(pm)
    assert fastpeft.trainable_parameters(fm)[0] == peft_trainable(pm)
    with torch.no_grad():
        assert_outputs_match(output(fm), output(pm), output(base))


@pytest.mark.parametrize("build, output, kwargs, not_adapted", [c[1:] for c in HF_CASES], ids=HF_IDS)
def test_transformers_fastpeft_to_peft(tmp_path, build, output, kwargs, not_adapted):
    base = build()
    fm = fast_model(base, kwargs)
    check_not_adapted(fm, not_adapted)
    fastpeft.save_adapter(fm, tmp_path)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()

    check_not_adapted(pm, not_adapted)
    assert peft_targets(pm) == set(fastpeft.lora_layers(fm))
    with torch.no_grad():
        assert_outputs_match(output(pm), output(fm), output(base))


@pytest.mark.parametrize("build, output, kwargs, not_adapted", [c[1:] for c in HF_CASES], ids=HF_IDS)
def test_transformers_saved_keys_match_peft(tmp_path, build, output, kwargs, not_adapted):
    base = build()
    peft_model(base, kwargs).save_pretrained(tmp_path / "peft")
    fastpeft.save_adapter(fast_model(base, kwargs), tmp_path / "fastpeft")
    ours, theirs = saved_shapes(tmp_path / "fastpeft"), peft_saved_shapes(tmp_path / "peft")
    assert_same_keys(ours, theirs)
    if not_adapted is not None:
        assert not any(f"{not_adapted}.lora_" in k for k in ours)


def test_peft_file_with_a_saved_lm_head_weight_loads(tmp_path):
    """LoRA on ``lm_head``: PEFT saves the head's base weight beside the factors (``save_embedding_layers="auto"``,
    for a resized vocabulary) and loads it into the base layer; fastpeft accepts the key (the shape checked with the
    rest) and does the same. A head weight of another shape (a vocabulary not resized yet) is refused before any
    change."""
    base = llama_base()
    pm = peft_model(base, dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():  # a trained (or resized-then-trained) head: the saved base weight is not the model's
        pm.base_model.model.lm_head.base_layer.weight.add_(0.25)
    pm.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in safetensors_torch.load_file(
        str(tmp_path / "adapter_model.safetensors"))
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert_outputs_match(llama_out(fm), llama_out(pm), llama_out(base))
    bigger = llama_base()
    bigger.resize_token_embeddings(80)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head\..*must have shape \(80, .* for this model"):
        fastpeft.load_adapter(bigger, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in bigger.state_dict().items())


def test_peft_orthogonal_init_adapters_load_and_weight_tying_files_are_named(tmp_path):
    """PEFT's "orthogonal" init leaves the base weights as they are (its A and B are all the adapter holds): its
    files load with PEFT's outputs (before 2026-12-01 refused as if it changed the base, as PiSSA does). A file
    saved with ensure_weight_tying and modules_to_save is refused naming that option (it was an "unexpected keys"
    error), the model unchanged; PiSSA stays refused."""
    import json

    base, x = toy_base(), toy_input()
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights="orthogonal"))
    perturb_trainable(pm, 2)
    pm.eval().save_pretrained(tmp_path / "orth")
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "orth").eval()
    with torch.no_grad():
        assert_outputs_match(fm(x), pm(x), base(x))
    cfg_path = tmp_path / "orth" / "adapter_config.json"
    for edit, words in ((dict(ensure_weight_tying=True, modules_to_save=["head"]), "ensure_weight_tying"),
                        (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'")):
        cfg = json.loads(cfg_path.read_text())
        cfg.update(edit)
        cfg_path.write_text(json.dumps(cfg))
        model = copy.deepcopy(base)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=words):
            fastpeft.load_adapter(model, tmp_path / "orth")
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not any(isinstance(m, fastpeft.FastLoRALinear) for m in model.modules())
        cfg.pop("ensure_weight_tying", None)
        cfg.update(modules_to_save=None, init_lora_weights="orthogonal")
        cfg_path.write_text(json.dumps(cfg))
    cfg = json.loads(cfg_path.read_text())  # EVA (A from activations, B zero at init): the base untouched too
    cfg["init_lora_weights"] = "eva"
    cfg_path.write_text(json.dumps(cfg))
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "orth").eval()
    with torch.no_grad():
        assert_outputs_match(fm(x), pm(x), base(x))


def test_auto_peft_model_opens_a_folder_saved_without_task_type(tmp_path):
    """PEFT's AutoPeftModelForCausalLM finds the model class from ``auto_mapping`` when task_type is None (as
    tutorials often leave it); before 2026-12-01 fastpeft's config lacked it and the folder could not be opened."""
    base = llama_base()
    base.save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    fm = fast_model(base, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    fastpeft.save_adapter(fm, tmp_path / "adapter")
    pm = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert type(pm.base_model.model) is type(base)
    with torch.no_grad():
        assert_outputs_match(llama_out(pm), llama_out(fm), llama_out(base))


@pytest.mark.parametrize("init", [True, "gaussian", False, "orthogonal"], ids=lambda v: f"init-{v}")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_seed_gives_peft_s_initial_adapters(init, dora):
    """Under the same seed, inject draws PEFT's initial factors (its two nn.Linear inits, then its init, on the CPU in
    fp32): a run moved from get_peft_model to inject starts from the same weights. Before 2026-12-01 A differed."""
    base = llama_base()
    targets = ["q_proj", "down_proj"] if dora else ["q_proj", "v_proj", "embed_tokens"]
    kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, use_dora=dora)
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    torch.manual_seed(5)
    fm = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p for n, p in pm.named_parameters()
              if p.requires_grad}
    for name, layer in fastpeft.lora_layers(fm).items():
        a, b = layer.adapter_parameters("default")
        ka, kb = ((f"{name}.lora_embedding_A", f"{name}.lora_embedding_B") if "embed" in name else
                  (f"{name}.lora_A.weight", f"{name}.lora_B.weight"))
        assert torch.equal(a, theirs[ka]) and torch.equal(b, theirs[kb]), name
        if dora:
            assert torch.equal(layer.magnitude("default"), theirs[f"{name}.lora_magnitude_vector.weight"])


def test_inject_takes_peft_s_lora_config_and_its_drop_in_fields():
    """PEFT code swaps only get_peft_model for inject: a peft.LoraConfig is taken as fastpeft's (same layers, same
    initial weights under a seed), and fastpeft.LoraConfig takes PEFT's inference_mode (the adapter added frozen),
    fan_in_fan_out (read from each layer) and ensure_weight_tying=False. Before 2026-12-01 each was a TypeError."""
    base = llama_base()
    kw = dict(r=4, lora_alpha=8, target_modules={"q_proj", "v_proj"}, task_type="CAUSAL_LM", lora_dropout=0.1)
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    torch.manual_seed(3)
    fm = fastpeft.inject(copy.deepcopy(base), peft.LoraConfig(**kw))
    assert set(fastpeft.lora_layers(fm)) == peft_targets(pm)
    assert fastpeft.trainable_parameters(fm)[0] == peft_trainable(pm)
    layer = fm.model.layers[1].self_attn.v_proj
    assert torch.equal(layer.adapter_parameters("default")[0],
                       pm.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight)
    frozen = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj"], inference_mode=True, fan_in_fan_out=True, ensure_weight_tying=False))
    assert fastpeft.trainable_parameters(frozen)[0] == 0 and len(fastpeft.lora_layers(frozen)) == 2
