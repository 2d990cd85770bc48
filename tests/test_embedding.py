"""LoRA on ``nn.Embedding`` (PEFT's ``lora.Embedding``: ``lora_embedding_A`` (r, num_embeddings),
``lora_embedding_B`` (embedding_dim, r), y = E[x] + s A^T[x] B^T, no dropout on ids) through ``FastLoRAEmbedding``,
``inject`` and ``load_adapter``: PEFT's files both ways with PEFT's outputs and gradients bit for bit, training,
merge / ``merge_and_unload`` (an nn.Embedding back), tied input / output embeddings, many adapters per batch, fp32
adapters on a bf16 base, ``to_peft``, refusals. Before 2026-12-01 ``inject`` refused embedding targets (recipes
such as continued pretraining put ``embed_tokens`` in target_modules)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from conftest import assert_close_report, loss_step, peft_and_fastpeft_mixed_batches, train_steps  # noqa: E402
from fastpeft import FastLoRAEmbedding, LoraConfig, SparseDeltaConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB = 61
TARGETS = ["embed_tokens", "q_proj", "lm_head"]


def llama(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tie, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base():
    return llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


def peft_model(base, **kw):
    torch.manual_seed(3)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "Setting save_embedding_layers to True"
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))


def save(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


def _factor_key(name: str) -> str:
    """A LoRA factor's name with PEFT's and fastpeft's spellings made one (embedding factors as the others')."""
    name = name.replace("base_model.model.", "").replace("_adapters", "").replace(".default", "")
    return name.replace(".weight", "").replace("lora_embedding_", "lora_")


def step(model, ids):
    """Logits and the gradients of the LoRA factors by their common name."""
    return loss_step(model, ids, _factor_key)


def test_peft_files_load_with_peft_outputs_and_gradients_and_ours_load_into_peft(base, ids, tmp_path):
    pm = peft_model(base)
    folder = save(pm, tmp_path / "peft")
    prefix = "base_model.model.model.embed_tokens."
    assert {prefix + "lora_embedding_A", prefix + "lora_embedding_B", prefix + "base_layer.weight"} <= set(
        load_file(folder / "adapter_model.safetensors"))
    model = fastpeft.load_adapter(copy.deepcopy(base), folder)
    emb = model.model.embed_tokens
    assert isinstance(emb, FastLoRAEmbedding) and emb.lora_A.shape == (4, VOCAB) and emb.lora_B.shape == (32, 4)
    (lw, gw), (lg, gg) = step(pm, ids), step(model, ids)
    assert_close_report(lg, lw, 0, 0, "logits")
    assert gg.keys() == gw.keys() and len(gw) == 6
    for k in gw:
        assert_close_report(gg[k], gw[k], 0, 0, f"grad {k}")
    ours = tmp_path / "ours"
    fastpeft.save_adapter(model, ours)
    saved = load_file(ours / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, VOCAB)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # PEFT's save_embedding_layers="auto"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), ours).eval()
    model.eval()
    with torch.no_grad():
        assert_close_report(back(ids).logits, model(ids).logits, 0, 0, "ours in PEFT")


def test_inject_trains_merges_and_unloads_to_an_embedding(base, ids):
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    emb = model.model.embed_tokens
    assert torch.count_nonzero(emb.lora_A) == 0 and torch.count_nonzero(emb.lora_B) > 0  # PEFT's init: A zeros
    pm = peft_model(base, target_modules=["embed_tokens"], init_lora_weights=True)
    assert fastpeft.trainable_parameters(model)[0] == pm.get_nb_trainable_parameters()[0] == 4 * (VOCAB + 32)
    losses = train_steps(model, ids, 3)
    assert losses[-1] < losses[0] and torch.count_nonzero(emb.lora_A) > 0
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        emb.merge()
        assert_close_report(model(ids).logits, want, 1e-5, 1e-5, "merged")
        emb.unmerge()
        fastpeft.merge_and_unload(model)
        got = model(ids).logits
    assert type(model.model.embed_tokens) is nn.Embedding and model.model.embed_tokens.padding_idx == 0
    assert_close_report(got, want, 1e-5, 1e-5, "merge_and_unload")
    assert set(model.state_dict()) == set(base.state_dict())


def test_padding_idx_and_scale_grad_by_freq_as_peft():
    """A bare nn.Embedding with padding_idx and scale_grad_by_freq: outputs and gradients equal PEFT's layer."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("emb", nn.Embedding(20, 8, padding_idx=3, scale_grad_by_freq=True))
    pm = peft_model(net, target_modules=["emb"])
    ours = fastpeft.inject(copy.deepcopy(net), LoraConfig(r=4, lora_alpha=8, target_modules=["emb"],
                                                          init_lora_weights=False))
    with torch.no_grad():
        ours.emb.lora_A.copy_(pm.base_model.model.emb.lora_embedding_A["default"])
        ours.emb.lora_B.copy_(pm.base_model.model.emb.lora_embedding_B["default"])
    x = torch.tensor([[3, 1, 1, 5], [3, 7, 1, 3]])
    w = torch.randn(2, 4, 8)
    results = []
    for m in (pm, ours):
        y = m(x)
        (y * w).sum().backward()
        layer = m.base_model.model.emb if m is pm else m.emb
        a = layer.lora_embedding_A["default"] if m is pm else layer.lora_A
        b = layer.lora_embedding_B["default"] if m is pm else layer.lora_B
        results.append((y.detach(), a.grad, b.grad))
    for got, want, what in zip(results[1], results[0], ("y", "dA", "dB")):
        assert_close_report(got, want, 0, 0, what)
    assert torch.count_nonzero(results[1][1][:, 3]) == 0  # padding_idx: no gradient to its column of A


def test_two_adapters_per_sequence_as_peft_adapter_names(base, ids, tmp_path):
    pm = peft_model(base, target_modules=["embed_tokens", "q_proj"])
    a = save(pm, tmp_path / "a")
    other = peft_model(base, r=2, lora_alpha=2, target_modules=["embed_tokens"])
    b = save(other, tmp_path / "b")
    want, got, model = peft_and_fastpeft_mixed_batches(pm, base, a, b, ids)
    with torch.no_grad():
        emb = model.model.embed_tokens
        per_seq = emb(ids, torch.tensor([1, -1, 0]))   # the layer's own per-sequence ids
        assert_close_report(per_seq[1], base.model.embed_tokens(ids[1]), 0, 0, "base row")
        per_pos = torch.tensor([1, -1, 0]).unsqueeze(1).expand(ids.shape)  # the same, as per-position ids
        assert_close_report(emb(ids, per_pos), per_seq, 0, 0, "per position")
        for row, name in ((0, emb.adapter_names[1]), (2, emb.adapter_names[0])):  # each row: its adapter alone
            emb.set_adapter(name)
            assert_close_report(per_seq[row], emb(ids[row:row + 1])[0], 1e-6, 1e-6, f"row {row}")
    assert_close_report(got, want, 1e-6, 1e-6, "mixed batch")


def test_fp32_adapters_on_a_bf16_base(ids, tmp_path):
    """On a bf16 model both make fp32 factors (PEFT's get_peft_model, fastpeft's load_adapter / inject); the branch
    is computed in fp32 and the sum rounded once to bf16, as PEFT's layer does: outputs and gradients bit for bit."""
    base = llama().to(torch.bfloat16)
    pm = peft_model(base, target_modules=["embed_tokens"])
    model = fastpeft.load_adapter(copy.deepcopy(base), save(pm, tmp_path / "a"))
    emb, peft_emb = model.model.embed_tokens, pm.base_model.model.model.embed_tokens
    assert emb.lora_A.dtype == torch.float32 and emb.weight.dtype == torch.bfloat16
    w = torch.randn(*ids.shape, 32)
    results = []
    for layer in (peft_emb, emb):
        y = layer(ids)
        (y.float() * w).sum().backward()
        a = layer.lora_embedding_A["default"] if layer is peft_emb else layer.lora_A
        b = layer.lora_embedding_B["default"] if layer is peft_emb else layer.lora_B
        results.append((y.detach(), a.grad, b.grad))
    assert results[1][0].dtype == torch.bfloat16 and results[1][1].dtype == torch.float32
    for got, want, what in zip(results[1], results[0], ("y", "dA", "dB")):
        assert_close_report(got, want, 0, 0, what)


@pytest.mark.parametrize("targets", [["embed_tokens"], ["embed_tokens", "lm_head"]], ids=["embed", "embed+head"])
def test_tied_embeddings_get_their_own_merged_copies(ids, targets):
    """LoRA on embed_tokens (and lm_head) of a model whose lm_head shares its weight: warned at inject (merge()
    changes the other too while merged), and merge_and_unload gives each LoRA layer its own merged copy, sets
    config.tie_word_embeddings False (a later tie_weights() would tie the head to the merged embedding: 191 off), and
    is right when both layers were merged into the one shared W before (each clone had the other's delta)."""
    base = llama(tie=True)
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="tied"):
        fastpeft.inject(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        for layer in fastpeft.lora_layers(model).values():
            layer.merge()
        with pytest.warns(UserWarning, match="tied_word_embeddings is set False|tie_word_embeddings is set False"):
            fastpeft.merge_and_unload(model)
        assert model.config.tie_word_embeddings is False
        if targets == ["embed_tokens"]:  # (E + ΔE - ΔE: the merge taken out first, to rounding)
            assert_close_report(model.lm_head.weight, base.lm_head.weight, 1e-6, 1e-6, "the head keeps E")
        assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
        assert_close_report(model(ids).logits, want, 1e-5, 1e-5, "merged, untied")
        model.tie_weights()
        assert_close_report(model(ids).logits, want, 1e-5, 1e-5, "after tie_weights()")


def test_merged_base_weights_are_neither_saved_nor_overwritten(base, ids, tmp_path):
    """The file holds a targeted embedding's base weight (PEFT's save_embedding_layers="auto"): saving while an
    adapter is merged into it would write E + ΔE (a load adds ΔE again), and loading such a file into a layer with a
    merged adapter would drop that merge; both refused, the model and folder unchanged."""
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["embed_tokens"],
                                                            init_lora_weights=False, bias="lora_only")).eval()
    fastpeft.save_adapter(model, tmp_path / "clean")
    emb = model.model.embed_tokens
    emb.merge()
    with pytest.raises(RuntimeError, match=r"'model.embed_tokens' has an adapter merged.*unmerge the layer first"):
        fastpeft.save_adapter(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    before = emb.weight.clone()
    with pytest.raises(RuntimeError, match=r"base weight of 'model.embed_tokens'.*merged.*unmerge the layer first"):
        fastpeft.load_adapter(model, tmp_path / "clean", adapter_name="b")
    assert torch.equal(emb.weight, before) and emb.adapter_names == ["default"]
    emb.unmerge()
    loaded = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "clean").eval()  # bias="lora_only", no bias
    with torch.no_grad():
        assert_close_report(loaded(ids).logits, model(ids).logits, 0, 0, "reloaded")


def test_all_linear_leaves_embedding_layers_alone_and_layerwise_groups(base):
    """all-linear (PEFT's: no embeddings) as a second adapter does not land on an embedding LoRA layer; layer-wise
    learning rates put an embedding's LoRA factors below the stack."""
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["embed_tokens"]))
    fastpeft.inject(model, LoraConfig(r=2, target_modules="all-linear"), adapter_name="b")
    assert model.model.embed_tokens.adapter_names == ["default"]
    fastpeft.set_adapter(model, "default")
    groups = fastpeft.layerwise_param_groups(model, lr=1.0, decay=0.5)
    lowest = min(groups, key=lambda g: g["lr"])
    emb = model.model.embed_tokens
    assert any(p is emb.lora_A for p in lowest["params"]) and any(p is emb.lora_B for p in lowest["params"])


def test_the_constructor():
    layer = FastLoRAEmbedding(20, 8, r=2, padding_idx=1, init_lora_weights=False)
    assert layer.weight.shape == (20, 8) and (layer.in_features, layer.out_features) == (20, 8)
    assert "padding_idx=1" in repr(layer)
    x = torch.tensor([[1, 5, 7]])
    y = layer(x)
    assert y.shape == (1, 3, 8) and layer.scaling == 4.0
    assert_close_report(y[0, 0], layer.weight[1] + (layer.lora_B @ layer.lora_A[:, 1]) * 4.0, 1e-6, 1e-6, "row 0")
    with pytest.raises(TypeError, match="from_embedding"):
        FastLoRAEmbedding.from_linear(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        layer.add_adapter("d", 2, 2, use_dora="yes")


def test_to_peft(base, ids):
    model = fastpeft.inject(copy.deepcopy(base), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                            init_lora_weights=False)).eval()
    with torch.no_grad():
        want = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = fastpeft.to_peft(model)
    assert type(pm.base_model.model.model.embed_tokens.base_layer) is nn.Embedding
    with torch.no_grad():
        assert_close_report(pm(ids).logits, want, 0, 0, "to_peft")


def test_refusals_name_the_module(base):
    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2

    for config, match in (
            (LoraConfig(target_modules=["embed_tokens"], lora_bias=True), "'model.embed_tokens'.*not lora_bias=True"),
            (LoraConfig(target_modules=["embed_tokens"], sparse_density=0.01), "'model.embed_tokens'.*not a sparse"),
            (SparseDeltaConfig(target_modules=["embed_tokens"]), "'model.embed_tokens'.*not a sparse delta")):
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            fastpeft.inject(model, config)
        assert type(model.model.embed_tokens) is nn.Embedding
    for make, exc, match in ((lambda: nn.Embedding(9, 4, max_norm=1.0), ValueError, "max_norm=1.0"),
                             (lambda: nn.Embedding(9, 4, sparse=True), ValueError, "sparse=True"),
                             (lambda: Scaled(9, 4), TypeError, "Scaled, an nn.Embedding with a forward of its own")):
        net = nn.Sequential()
        net.add_module("emb", make())
        with pytest.raises(exc, match=r"module 'emb'.*" + match):
            fastpeft.inject(net, LoraConfig(target_modules=["emb"]))
        assert type(net.emb) is not FastLoRAEmbedding
    layer = FastLoRAEmbedding.from_embedding(nn.Embedding(9, 4))
    with pytest.raises(TypeError, match=r"int64 / int32 tensor of ids in \[0, 9\), got torch.float32"):
        layer(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="'b': sparse_density=0.1 on an embedding layer"):
        layer.add_adapter("b", 2, 2, sparse_density=0.1)
    with pytest.raises(TypeError, match="no nn.Linear form"):
        layer.to_linear()
    with pytest.raises(TypeError, match="embedding must be an nn.Embedding, got Linear"):
        FastLoRAEmbedding.from_embedding(nn.Linear(3, 3))


def test_base_embeddings_are_saved_where_peft_saves_them(tmp_path):
    """PEFT's save_embedding_layers="auto" saves the embeddings' base weights where a target is named like an
    embedding (embed_tokens, lm_head; tested above on a Llama), not for GPT-2's wte (154 MB of fp32 a file)."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB,
                                                                n_positions=16))
    with pytest.warns(UserWarning, match=r"tied to \['lm_head.weight'\]"):
        model = fastpeft.inject(gpt2, LoraConfig(r=4, target_modules=["wte", "c_attn"]))
    fastpeft.save_adapter(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.wte.lora_embedding_A" in keys
    assert not any(k.endswith("base_layer.weight") for k in keys), sorted(keys)


def test_peft_files_with_resized_embeddings_load(ids, tmp_path):
    """New tokens: PEFT saves the untargeted input / output embeddings whole (save_embedding_layers, as "auto" does
    after resize_token_embeddings) as <module>.weight; they load into the (resized) model as PEFT loads them, and
    into a model not resized the refusal says what to do, the model unchanged."""
    def resized():
        model = llama()
        model.resize_token_embeddings(VOCAB + 9)
        return model

    trained = resized()
    with torch.no_grad():
        trained.model.embed_tokens.weight[VOCAB:].normal_()
        trained.lm_head.weight[VOCAB:].normal_()
    pm = peft_model(trained, target_modules=["q_proj"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    x = torch.cat([ids, torch.full((3, 1), VOCAB + 4)], 1)                 # a new token
    model = fastpeft.load_adapter(resized(), tmp_path / "a").eval()
    with torch.no_grad():
        assert_close_report(model(x).logits, pm(x).logits, 0, 0, "resized vocabulary")
    small = llama()
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ValueError, match=rf"'model.embed_tokens.weight' has {VOCAB + 9} rows.*"
                                         rf"resize_token_embeddings\({VOCAB + 9}\)"):
        fastpeft.load_adapter(small, tmp_path / "a")
    assert all(torch.equal(small.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("init", [True, False])
def test_dora_embedding_matches_peft(tmp_path, init):
    """PEFT's DoRA embedding: g ⊙ (E[x] + s Aᵀ[x] Bᵀ), the magnitude (embedding_dim,) the norms of E + s (B A)ᵀ's
    columns over the vocabulary; initial draws, outputs, every gradient, files both ways, merge and unmerge."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 8, padding_idx=0), nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.emb(x)).mean(1)

    torch.manual_seed(0)
    base = Net()
    cfg = dict(r=4, lora_alpha=8, target_modules=["emb", "fc"], use_dora=True, init_lora_weights=init)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**cfg))
    pl, fl = theirs.base_model.model.emb, ours.emb
    torch.testing.assert_close(fl.magnitude(), pl.lora_magnitude_vector["default"].weight, rtol=0, atol=0)
    with torch.no_grad():  # non-zero A (the init's is zero) and a magnitude away from the norm
        pl.lora_embedding_A["default"].normal_()
        pl.lora_magnitude_vector["default"].weight.mul_(1.3)
        fl.lora_A.copy_(pl.lora_embedding_A["default"])
        fl.magnitude().copy_(pl.lora_magnitude_vector["default"].weight)
    x = torch.randint(0, 50, (3, 7))
    y_t, y_o = theirs(x), ours(x)
    torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-5)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    for got, want in ((fl.lora_A.grad, pl.lora_embedding_A["default"].grad),
                      (fl.lora_B.grad, pl.lora_embedding_B["default"].grad),
                      (fl.magnitude().grad, pl.lora_magnitude_vector["default"].weight.grad)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    fastpeft.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want = theirs(x)
        torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")(x), want,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "theirs")(x), want,
                                   rtol=1e-5, atol=1e-5)
        fl.merge()
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
        fl.unmerge()
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)


def test_fp64_dora_magnitude_is_initialised_in_fp64():
    layer = FastLoRAEmbedding.from_embedding(nn.Embedding(50, 8, dtype=torch.float64), r=4, use_dora=True,
                                             init_lora_weights=False)
    want = (layer._w() + layer._exact_delta()).norm(dim=1)
    torch.testing.assert_close(layer.magnitude(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dora", [False, True])
def test_scaled_embeddings_as_peft(tmp_path, dora):
    """A transformers scaled embedding (Gemma 3's: the lookup times embed_scale): PEFT scales each adapter's term by
    embed_scale too; logits, gradients, files and merge_and_unload (which gives the scaled module back) as PEFT."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    base = transformers.Gemma3ForCausalLM(cfg).eval()
    kind = type(base.model.embed_tokens)
    c = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False, use_dora=dora)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**c))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**c))
    ids = torch.randint(0, 64, (2, 6))
    y_t, y_o = theirs(ids).logits, ours(ids).logits
    torch.testing.assert_close(y_o, y_t, rtol=1e-5, atol=1e-6)
    y_t.square().sum().backward()
    y_o.square().sum().backward()
    got, want = ours.model.embed_tokens.lora_A.grad, theirs.base_model.model.model.embed_tokens.lora_embedding_A[
        "default"].grad
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    fastpeft.save_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(ids).logits, y_o,
                                   rtol=1e-5, atol=1e-6)
        merged = fastpeft.merge_and_unload(ours)
        assert type(merged.model.embed_tokens) is kind
        torch.testing.assert_close(merged(ids).logits, y_o, rtol=1e-5, atol=1e-6)


def test_bart_style_number_scale_keeps_the_base_exact_in_bf16_and_matches_peft():
    """BART's scaled embedding multiplies by a Python number: the base lookup by it as such (a bf16 model's identity
    adapter gives the base exactly), each adapter's term by it rounded to the weight's dtype (PEFT's rule)."""
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = BartScaledWordEmbedding(40, 32, 0, embed_scale=32 ** 0.5)
            self.fc = nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(self.emb(x))

    torch.manual_seed(0)
    base = Net().to(torch.bfloat16)
    x = torch.randint(0, 40, (3, 5))
    identity = fastpeft.inject(copy.deepcopy(base), LoraConfig(target_modules=["emb"]))
    with torch.no_grad():
        assert torch.equal(identity(x), base(x))
    c = dict(r=4, lora_alpha=8, target_modules=["emb"], init_lora_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**c))
    torch.manual_seed(1)
    ours = fastpeft.inject(copy.deepcopy(base), LoraConfig(**c))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        merged = fastpeft.merge_and_unload(copy.deepcopy(ours))
        assert isinstance(merged.emb.embed_scale, float)  # (not replaced by a tensor)
    layer = ours.emb
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    assert layer.__dict__["_scaled_module"]._parameters["weight"] is None  # no old table kept alive
