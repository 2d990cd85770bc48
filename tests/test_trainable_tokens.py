"""PEFT's trainable tokens (``LoraConfig(trainable_token_indices=...)``): a few rows of the input embeddings trained
beside LoRA (new special tokens), the output head tied to them following, in PEFT's files both ways.

Compared with PEFT on tiny transformers models: outputs, gradients, trainable counts, file keys, mixed batches,
merging; then what PEFT does not check (training moves only those rows; the base weight never changes) and the
refusals.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import fastpeft  # noqa: E402
from fastpeft import LoraConfig, TrainableTokensWrapper  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*tie_word_embeddings.*:UserWarning")]

VOCAB = 64
TOKENS = [3, 5, 60]


def llama(tie: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def gemma3():
    """Gemma 3's scaled word embeddings (embed_scale = sqrt(hidden)), tied to the head."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return transformers.Gemma3ForCausalLM(config).eval()


BASES = {"llama-untied": lambda: llama(False), "llama-tied": lambda: llama(True), "gemma3-tied": gemma3}


def token_ids(batch=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, 9), generator=g)
    ids[:, :3] = torch.tensor(TOKENS)  # the trained tokens appear in every row
    return ids


@torch.no_grad()
def perturb(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def peft_model(base, **kw):
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  init_lora_weights=False, **kw))
    perturb(pm)
    return pm.eval()


def logits(model, ids=None, **kw):
    with torch.no_grad():
        return model(input_ids=token_ids() if ids is None else ids, **kw).logits


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def file_keys(directory):
    return {k: tuple(v.shape) for k, v in safetensors_torch.load_file(str(directory / "adapter_model.safetensors"))
            .items()}


# ---- PEFT's files both ways ------------------------------------------------------------------------------
SPECS = {"list": TOKENS, "dict-embed": {"embed_tokens": TOKENS}}


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
@pytest.mark.parametrize("base_id", list(BASES), ids=list(BASES))
def test_peft_file_loads_and_ours_loads_in_peft(tmp_path, base_id, spec):
    base = BASES[base_id]()
    pm = peft_model(base, trainable_token_indices=SPECS[spec])
    pm.save_pretrained(tmp_path / "peft")

    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()

    torch.testing.assert_close(logits(fm), logits(pm), rtol=1e-5, atol=1e-5)
    assert (logits(pm) - logits(base)).abs().max() > 1e-1  # the tokens and LoRA matter
    assert fastpeft.trainable_parameters(fm)[0] == trainable(pm)
    tied = base_id.endswith("tied") and not base_id.endswith("untied")
    assert isinstance(fm.lm_head, TrainableTokensWrapper) == tied  # the tied head follows the embeddings' rows

    fastpeft.save_adapter(fm, tmp_path / "ours")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "peft")  # the tied head's rows saved once
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back), logits(fm), rtol=1e-5, atol=1e-5)


def test_dict_with_other_ids_for_the_head_keeps_two_sets_of_rows(tmp_path):
    """A dict naming embeddings and head with different ids: two wrappers, each its own rows (PEFT does not tie
    them then), both saved."""
    base = llama(False)
    spec = {"embed_tokens": [3, 5], "lm_head": [5, 7, 9]}
    pm = peft_model(base, trainable_token_indices=spec)
    pm.save_pretrained(tmp_path)
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(fm), logits(pm), rtol=1e-5, atol=1e-5)
    assert fm.lm_head.rows("default").token_indices.tolist() == [5, 7, 9]
    fastpeft.save_adapter(fm, tmp_path / "ours")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path)
    assert sum("token_adapter" in k for k in file_keys(tmp_path)) == 2


@pytest.mark.parametrize("base_id", ["llama-untied", "llama-tied", "gemma3-tied"])
def test_gradients_match_peft(base_id):
    base = BASES[base_id]()
    pm = peft_model(base, trainable_token_indices=TOKENS).train()
    fm = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                         trainable_token_indices=TOKENS))
    fastpeft.load_adapter(fm, _saved(pm))
    fm.train()
    ids = token_ids()
    pm(input_ids=ids, labels=ids).loss.backward()
    fm(input_ids=ids, labels=ids).loss.backward()
    theirs = {n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    rows = fm.model.embed_tokens.rows("default").trainable_tokens_delta
    torch.testing.assert_close(rows.grad, theirs["model.embed_tokens.token_adapter.trainable_tokens_delta.default"],
                               rtol=1e-5, atol=1e-7)
    assert rows.grad.abs().min() > 0  # every trained row gets a gradient (each token is in the batch)
    a = fm.model.layers[0].self_attn.q_proj.adapter_parameters("default")[0]
    torch.testing.assert_close(a.grad, theirs["model.layers.0.self_attn.q_proj.lora_A.default.weight"],
                               rtol=1e-4, atol=1e-7)


def _saved(pm):
    import tempfile
    d = tempfile.mkdtemp(prefix="tt-")
    pm.save_pretrained(d)
    return d


# ---- training --------------------------------------------------------------------------------------------
def test_training_moves_only_those_rows_and_the_tied_head_follows():
    base = llama(True)
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"],
                                                            trainable_token_indices=TOKENS)).train()
    w0 = model.model.embed_tokens.original_module.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert torch.equal(model.model.embed_tokens.original_module.weight, w0)  # the base weight never changes
    emb = model.model.embed_tokens
    other = torch.tensor([[1, 2, 4, 6]])
    torch.testing.assert_close(emb(other), base.model.embed_tokens(other), rtol=0, atol=0)
    new = emb(torch.tensor([TOKENS]))[0]
    assert (new - base.model.embed_tokens(torch.tensor([TOKENS]))[0]).abs().min() > 0
    # the head's columns for those tokens are the new rows: h @ rows^T
    h = torch.randn(2, 32)
    torch.testing.assert_close(model.lm_head(h)[:, TOKENS], h @ new.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lm_head(h)[:, [1, 2]], base.lm_head(h)[:, [1, 2]], rtol=0, atol=0)


def test_bf16_base_keeps_fp32_rows_as_peft():
    base = llama(True).to(torch.bfloat16)
    fm = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3]))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  trainable_token_indices=[3]))
    rows = fm.model.embed_tokens.rows("default").trainable_tokens_delta
    assert rows.dtype == torch.float32 and fm.lm_head.rows("default").trainable_tokens_delta is rows
    with torch.no_grad():
        r = torch.randn(1, 32)
        rows.copy_(r)
        pm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].copy_(r)
    torch.testing.assert_close(logits(fm), logits(pm.eval()), rtol=0, atol=0)


# ---- several adapters --------------------------------------------------------------------------------------
def test_mixed_batch_set_and_delete_adapter_as_peft(tmp_path):
    base = llama(True)
    pm = peft_model(base, trainable_token_indices=[3, 5])
    pm.add_adapter("b", peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[5, 60],
                                        init_lora_weights=False))
    perturb(pm, seed=9)
    pm.save_pretrained(tmp_path)
    fm = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    fastpeft.load_adapter(fm, tmp_path / "b", adapter_name="b")
    fm.eval()
    ids = token_ids()
    theirs = logits(pm, ids, adapter_names=["default", "b", "__base__"])
    with fastpeft.mixed_batch(fm, ["default", "b", None]):
        ours = logits(fm, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    pm.set_adapter("b")
    fastpeft.set_adapter(fm, "b")
    torch.testing.assert_close(logits(fm, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)
    fastpeft.delete_adapter(fm, "b")
    fastpeft.delete_adapter(fm, "default")
    torch.testing.assert_close(logits(fm, ids), logits(base, ids), rtol=0, atol=0)


# ---- merging -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base_id", list(BASES), ids=list(BASES))
def test_merge_and_unload_writes_the_rows(base_id):
    base = BASES[base_id]()
    fm = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                         trainable_token_indices=TOKENS))
    perturb(fm)
    fm.eval()
    before = logits(fm)
    merged = fastpeft.merge_and_unload(fm)
    assert type(merged.model.embed_tokens) is type(base.model.embed_tokens)
    assert not any(isinstance(m, TrainableTokensWrapper) for m in merged.modules())
    torch.testing.assert_close(logits(merged), before, rtol=1e-5, atol=1e-5)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == (
        base.lm_head.weight is base.model.embed_tokens.weight)  # both took the rows: still tied


def test_merge_of_a_tied_head_named_alone_copies_its_weight():
    """Tokens on the tied head only: its rows go into a copy, the embeddings keep theirs (warned, untied)."""
    base = llama(True)
    fm = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"],
                                                         trainable_token_indices={"lm_head": [3, 5]}))
    assert not isinstance(fm.model.embed_tokens, TrainableTokensWrapper)
    perturb(fm)
    before = logits(fm.eval())
    with pytest.warns(UserWarning, match="trained tokens of \\['lm_head'\\] go into a copy"):
        merged = fastpeft.merge_and_unload(fm)
    torch.testing.assert_close(logits(merged), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert merged.config.tie_word_embeddings is False


# ---- refusals ------------------------------------------------------------------------------------------------
def test_loading_other_ids_over_an_adapter_is_refused(tmp_path):
    base = llama(False)
    peft_model(base, trainable_token_indices=[3, 5]).save_pretrained(tmp_path)
    fm = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3]))
    rows = fm.model.embed_tokens.rows("default").trainable_tokens_delta.detach().clone()
    with pytest.raises(ValueError, match=r"trains tokens .*\[3, 5\].*'default'.*\[3\].*another adapter_name"):
        fastpeft.load_adapter(fm, tmp_path)
    assert torch.equal(fm.model.embed_tokens.rows("default").trainable_tokens_delta, rows)  # unchanged


def test_config_round_trip_keeps_the_spec(tmp_path):
    base = llama(False)
    fm = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"],
                                                         trainable_token_indices={"embed_tokens": [1, 2]}))
    fastpeft.save_adapter(fm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": [1, 2]}
    assert fastpeft.read_adapter_config(tmp_path).trainable_token_indices == {"embed_tokens": [1, 2]}


class NoEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


@pytest.mark.parametrize("build, kw, match", [
    (lambda: llama(False), dict(trainable_token_indices=[3, VOCAB]), f"token id {VOCAB} is out of range for its 64"),
    (lambda: llama(False), dict(trainable_token_indices={"wte": [1]}), "'wte', which matches no module"),
    (NoEmbeddings, dict(trainable_token_indices=[1]), "list trains rows of the input embeddings, but the model has"),
    (NoEmbeddings, dict(trainable_token_indices={"norm": [1]}), "'norm' is a LayerNorm"),
    (lambda: llama(False), dict(trainable_token_indices=[1], modules_to_save=["embed_tokens"]),
     "'model.embed_tokens' is in modules_to_save"),
    (lambda: llama(True), dict(trainable_token_indices=[1], target_modules=["q_proj", "lm_head"]),
     "'lm_head' .* is a LoRA / sparse-delta target"),
], ids=["id-out-of-range", "name-matches-nothing", "no-input-embeddings", "a-layernorm", "also-modules_to_save",
        "tied-head-a-lora-target"])
def test_bad_targets_are_refused_before_any_change(build, kw, match):
    model = build()
    kw = {"target_modules": ["q_proj"], **kw}
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        fastpeft.inject(model, LoraConfig(r=2, **kw))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_the_padding_row_gets_no_gradient_as_peft():
    """A trained token that is the embeddings' padding_idx (a new <pad>) gets no gradient (F.embedding's rule), as in
    PEFT; before 2026-12-01 it got one (4029 against PEFT's 0 on a tiny LLaMA)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg)
    kw = dict(r=4, target_modules=["q_proj"], trainable_token_indices=[0, 3])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    fm = fastpeft.inject(copy.deepcopy(base), LoraConfig(**kw))
    ids = torch.tensor([[0, 3, 5, 0, 3, 7]])
    pm(input_ids=ids, labels=ids).loss.backward()
    fm(input_ids=ids, labels=ids).loss.backward()
    theirs = pm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].grad
    ours = fm.model.embed_tokens.rows("default").trainable_tokens_delta.grad
    assert ours[0].abs().max() == 0 and ours[1].abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_a_head_with_a_bias_keeps_it_on_the_trained_columns():
    """An output head with a bias (dict form naming it): the trained columns are h @ rows^T + bias[ids], the others the
    head's own. (PEFT's layer drops the bias there; fastpeft keeps nn.Linear's meaning.)"""
    torch.manual_seed(0)
    head = nn.Linear(8, 10)
    wrapped = TrainableTokensWrapper(copy.deepcopy(head), "default", [2, 5])
    rows = wrapped.rows("default").trainable_tokens_delta
    with torch.no_grad():
        rows.add_(torch.randn_like(rows))
    h = torch.randn(3, 4, 8)
    out = wrapped(h)
    torch.testing.assert_close(out[..., [2, 5]], h @ rows.detach().T + head.bias.detach()[[2, 5]])
    keep = [i for i in range(10) if i not in (2, 5)]
    torch.testing.assert_close(out[..., keep], head(h)[..., keep], rtol=0, atol=0)


def test_to_peft_refuses_adapters_with_and_without_tokens_before_any_change(tmp_path):
    model = fastpeft.inject(llama(False), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3]))
    fastpeft.inject(model, LoraConfig(r=2, target_modules=["q_proj"]), "plain", activate=False)
    want = logits(model.eval())
    with pytest.raises(ValueError, match=r"\['default'\] train tokens and \['plain'\] do not"):
        fastpeft.to_peft(model)
    assert isinstance(model.model.embed_tokens, TrainableTokensWrapper)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)


@pytest.mark.parametrize("base_id", ["llama-untied", "llama-tied"])
def test_weight_holds_the_trained_rows_as_peft_s(base_id):
    """``get_output_embeddings().weight`` (what TRL's fused LM-head loss and Liger's read for their own product) is
    the base weight with the trained rows in place, differentiable in them, as PEFT's wrapper gives; before
    2026-12-01 it was the base weight, and SFTTrainer's loss silently ignored the head's rows."""
    base = BASES[base_id]()
    spec = {"embed_tokens": TOKENS, "lm_head": TOKENS}
    pm = peft_model(base, trainable_token_indices=spec)
    fm = fastpeft.load_adapter(copy.deepcopy(base), _saved(pm))
    for ours, theirs in ((fm.get_output_embeddings(), pm.get_output_embeddings()),
                         (fm.get_input_embeddings(), pm.get_input_embeddings())):
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=0)
    h = torch.randn(5, 32)
    (h @ fm.get_output_embeddings().weight.T).square().sum().backward()
    rows = fm.lm_head.rows("default").trainable_tokens_delta
    assert rows.grad is not None and rows.grad.abs().min() > 0


def test_compiles_without_graph_breaks_with_a_padding_idx():
    """A padding_idx on the embeddings (Gemma's default 0) is read when the adapter is made, not in forward: the model
    compiles with fullgraph=True (before 2026-12-01 the forward read a data pointer and broke the graph)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = fastpeft.inject(transformers.LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"],
                                                                          trainable_token_indices=[0, 3]))
    ids = token_ids(2)
    want = model(input_ids=ids, labels=ids).loss
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids=ids, labels=ids).loss, want, rtol=1e-6, atol=1e-6)


def test_scale_grad_by_freq_divides_the_rows_gradients_as_peft():
    """An embedding with ``scale_grad_by_freq=True`` divides each trained row's gradient by its id's count in the
    batch, as PEFT's lookup in the whole table does, ids outside the trained rows not counted for any of them
    (before 2026-12-01 not divided: 5x PEFT's for a token seen 5 times)."""
    base = llama(False)
    base.model.embed_tokens.scale_grad_by_freq = True
    kw = dict(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    fm = fastpeft.inject(copy.deepcopy(base), LoraConfig(**kw))
    ids = torch.tensor([[3, 3, 5, 7, 3, 9, 5, 3, 3, 11]])
    pm(input_ids=ids, labels=ids).loss.backward()
    fm(input_ids=ids, labels=ids).loss.backward()
    theirs = pm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].grad
    ours = fm.model.embed_tokens.rows("default").trainable_tokens_delta.grad
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("active", [True, False], ids=["first-active", "none-active"])
def test_tokens_refused_where_another_adapter_trains_the_tied_head(active):
    """Tied embeddings, adapter "a" trains a copy of the head (modules_to_save): a later adapter's trainable tokens
    are refused whichever adapter is active (before 2026-12-01, with "a" active they were taken and the head kept
    the old rows, 31.9 off in logits; with none active refused). The model is left as it was."""
    model = fastpeft.inject(llama(True), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    if not active:
        fastpeft.set_adapter(model, None)
    names = sorted(n for n, _ in model.named_modules())
    with pytest.raises(ValueError, match="another adapter trains a copy of that head"):
        fastpeft.inject(model, LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices=[3, 4]), "b",
                        activate=False)
    assert sorted(n for n, _ in model.named_modules()) == names


def test_to_peft_refuses_token_adapters_disagreeing_on_a_tied_head():
    """Tied embeddings and head, "a" trains tokens the head follows, "b" gives the head ids of its own: PEFT loads the
    two with b's logits 1.67 off (a review's measurement), so to_peft refuses before any change (before 2026-12-01 it
    returned that PeftModel)."""
    model = llama(True)
    fastpeft.inject(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5]), "a")
    fastpeft.inject(model, LoraConfig(r=2, target_modules=["v_proj"],
                                      trainable_token_indices={"embed_tokens": [7], "lm_head": [9]}), "b")
    fastpeft.set_adapter(model, "a")
    names = [(n, type(m).__name__) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"adapters \['b'\] give the head token ids of their own and \['a'\]"):
        fastpeft.to_peft(model)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == names


def test_to_peft_converts_a_tied_head_dict_with_the_embeddings_ids(tmp_path):
    """A dict giving the tied head the embeddings' own ids is a list for a tied model: beside a list adapter to_peft
    converts it, each adapter's logits PEFT's (not refused as disagreeing)."""
    model = llama(True)
    ids = token_ids()
    fastpeft.inject(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5]), "a")
    fastpeft.inject(model, LoraConfig(r=2, target_modules=["v_proj"],
                                      trainable_token_indices={"embed_tokens": [7], "lm_head": [7]}), "b")
    perturb(model)
    want = {}
    for name in ("a", "b"):
        fastpeft.set_adapter(model, name)
        with torch.no_grad():
            want[name] = model(ids).logits
    pm = fastpeft.to_peft(model)
    for name in ("a", "b"):
        pm.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(pm(ids).logits, want[name], rtol=1e-5, atol=1e-5)
