"""Sparse deltas on the reference path: the op vs float64 math and its gradients, index checks,
selection rules, SparseDeltaLinear, SparseDeltaConfig through inject, LoRA + sparse (RoSA), one-shot
gradient selection, and save / load with the adapter files."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft import FastLoRALinear, LoraConfig, SparseDeltaConfig, SparseDeltaLinear
from fastpeft.inject import adapter_configs
from fastpeft.io import CONFIG_NAME, WEIGHTS_NAME
from fastpeft.reference import dense_delta_ref, sparse_delta_linear_ref
from fastpeft.selection import count_for, select_indices
from test_inject import Toy


def _delta(out_f, in_f, b, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rb, cb = -(-out_f // b), -(-in_f // b)
    flat = torch.sort(torch.randperm(rb * cb, generator=g)[:n]).values
    idx = flat if b == 1 else torch.stack([flat // cb, flat % cb], 1)
    shape = (n,) if b == 1 else (n, b, b)
    return idx, torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("b", [1, 16, 32])
def test_dense_delta_places_entries_and_clips_edge_blocks(b):
    out_f, in_f = 48, 80
    idx, vals = _delta(out_f, in_f, b, 5)
    d = dense_delta_ref(idx, vals, out_f, in_f, b)
    assert d.shape == (out_f, in_f)
    expected = torch.zeros(out_f, in_f, dtype=torch.float64)
    for i in range(idx.shape[0]):
        if b == 1:
            expected.view(-1)[idx[i]] = vals[i]
        else:
            r, c = int(idx[i, 0]) * b, int(idx[i, 1]) * b
            blk = vals[i][: min(b, out_f - r), : min(b, in_f - c)]
            expected[r:r + blk.shape[0], c:c + blk.shape[1]] = blk
    torch.testing.assert_close(d, expected, rtol=0, atol=0)


@pytest.mark.parametrize("b", [1, 16])
def test_op_and_gradients_vs_float64(b):
    x = torch.randn(2, 7, 80, dtype=torch.float64, requires_grad=True)
    w = torch.randn(48, 80, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(48, dtype=torch.float64, requires_grad=True)
    idx, vals = _delta(48, 80, b, 4)
    vals.requires_grad_()
    y = fastpeft.sparse_delta_linear(x, w, bias, idx, vals, block_size=b)
    torch.testing.assert_close(y, x @ (w + dense_delta_ref(idx, vals, 48, 80, b)).T + bias)
    assert torch.autograd.gradcheck(lambda x, v: sparse_delta_linear_ref(x, w, bias, idx, v, b), (x[:1, :2], vals))
    dy = torch.randn_like(y)
    y.backward(dy)
    dense_dw = dy.reshape(-1, 48).T @ x.detach().reshape(-1, 80)
    if b == 1:
        torch.testing.assert_close(vals.grad, dense_dw.reshape(-1)[idx])
    else:
        for i in range(idx.shape[0]):
            r, c = int(idx[i, 0]) * b, int(idx[i, 1]) * b
            blk = dense_dw[r:r + b, c:c + b]
            torch.testing.assert_close(vals.grad[i][: blk.shape[0], : blk.shape[1]], blk)
    torch.testing.assert_close(w.grad, dense_dw)


def _bad_delta_cases():
    v4 = torch.zeros(4)
    return {
        "out-of-range": ((torch.tensor([0, 5, 9, 48 * 80]), v4, 1), ValueError, r"must be in \[0, 3840\)"),
        "negative": ((torch.tensor([-1, 5, 9, 10]), v4, 1), ValueError, r"must be in \[0, 3840\)"),
        "unsorted": ((torch.tensor([0, 9, 5, 10]), v4, 1), ValueError, "must be sorted"),
        "duplicated": ((torch.tensor([0, 5, 5, 10]), v4, 1), ValueError, "must be unique"),
        "length-mismatch": ((torch.tensor([0, 5, 9]), v4, 1), ValueError, r"delta_values must have shape \(3,\)"),
        "float-indices": ((torch.tensor([0.0, 5.0, 9.0, 10.0]), v4, 1), TypeError, "int32 or int64"),
        "2d-for-b1": ((torch.tensor([[0, 1]]), torch.zeros(1), 1), ValueError, "must be 1-D"),
        "block-col-range": ((torch.tensor([[0, 5]]), torch.zeros(1, 16, 16), 16), ValueError,
                            r"block columns must be in \[0, 5\)"),
        "block-values-shape": ((torch.tensor([[0, 1]]), torch.zeros(1, 8, 8), 16), ValueError,
                               r"delta_values must have shape \(1, 16, 16\)"),
        "block-unsorted": ((torch.tensor([[1, 0], [0, 3]]), torch.zeros(2, 16, 16), 16), ValueError, "must be sorted"),
        "block-size-0": ((torch.tensor([0]), torch.zeros(1), 0), ValueError, "block_size must be a positive int"),
    }


@pytest.mark.parametrize("case", list(_bad_delta_cases()))
def test_bad_indices_give_clear_errors(case):
    (idx, vals, b), exc, msg = _bad_delta_cases()[case]
    with pytest.raises(exc, match=msg):
        fastpeft.sparse_delta_linear(torch.randn(3, 80), torch.randn(48, 80), None, idx, vals, block_size=b)


def test_selection_rules():
    w = torch.randn(48, 80)
    assert count_for(0.01, 48, 80, 1) == 38 and count_for(0.01, 48, 80, 16) == 1
    mag = select_indices(w, 0.05, selection="magnitude")
    assert torch.equal(mag, torch.sort(torch.topk(w.abs().reshape(-1), mag.numel()).indices).values)
    scores = torch.zeros(48, 80)
    scores[3, 7], scores[40, 1] = 5.0, -9.0
    assert select_indices(w, 2 / (48 * 80), selection="scores", scores=scores).tolist() == [3 * 80 + 7, 40 * 80 + 1]
    blocks = select_indices(w, 0.2, block_size=16, selection="magnitude")
    assert blocks.shape == (3, 2) and bool((blocks[1:, 0] * 5 + blocks[1:, 1] > blocks[:-1, 0] * 5 + blocks[:-1, 1]).all())
    g = torch.Generator().manual_seed(1)
    r1 = select_indices(w, 0.1, generator=g)
    assert r1.numel() == 384 and bool((r1[1:] > r1[:-1]).all())
    with pytest.raises(ValueError, match="selection must be one of"):
        select_indices(w, 0.1, selection="best")
    with pytest.raises(ValueError, match="needs scores"):
        select_indices(w, 0.1, selection="scores")
    with pytest.raises(ValueError, match=r"density must be a float in \(0, 1\]"):
        select_indices(w, 0.0)


def test_sparse_delta_linear_layer():
    lin = nn.Linear(80, 48)
    layer = SparseDeltaLinear.from_linear(lin, density=0.05, block_size=1, selection="magnitude")
    assert layer.weight is lin.weight and not lin.weight.requires_grad
    assert layer.delta_indices.shape == (192,) and layer.delta_values.shape == (192,)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"delta_values"}
    x = torch.randn(4, 80)
    torch.testing.assert_close(layer(x), lin(x))  # zero delta at first
    with torch.no_grad():
        layer.delta_values.normal_()
    y = layer(x)
    torch.testing.assert_close(y, x @ (lin.weight + layer.dense_delta()).T + lin.bias)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.to_linear()(x), y, rtol=1e-5, atol=1e-5)
    blocks = SparseDeltaLinear(80, 48, density=0.2, block_size=16)
    assert blocks.delta_indices.shape == (3, 2) and blocks.delta_values.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        SparseDeltaLinear(80, 48, block_size=0)
    with pytest.raises(ValueError, match="selection must be one of"):
        SparseDeltaLinear(80, 48, selection="top")
    with pytest.raises(ValueError, match="in_features=80, got 79"):
        layer(torch.randn(2, 79))


def test_layer_trains_only_its_delta():
    torch.manual_seed(0)
    layer = SparseDeltaLinear(32, 16, density=0.25)
    target = nn.Linear(32, 16)
    x = torch.randn(64, 32)
    opt = torch.optim.Adam([layer.delta_values], lr=5e-2)
    losses = []
    for _ in range(40):
        loss = (layer(x) - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0] and layer.weight.grad is None


def test_inject_sparse_config_and_counts():
    m = Toy()
    x = torch.randn(3, 16)
    y0 = m(x)
    fastpeft.inject(m, SparseDeltaConfig(density=0.1, target_modules=["q_proj", "mlp.0"]))
    layers = fastpeft.sparse_layers(m)
    assert sorted(layers) == ["layers.0.attn.q_proj", "layers.0.mlp.0", "layers.1.attn.q_proj", "layers.1.mlp.0"]
    torch.testing.assert_close(m(x), y0)  # zero-initialised
    trainable, _ = fastpeft.trainable_parameters(m)
    assert trainable == 2 * (count_for(0.1, 16, 16, 1) + count_for(0.1, 32, 16, 1))
    with pytest.raises(ValueError, match="only adapter"):
        fastpeft.inject(m, LoraConfig(target_modules=["k_proj"]), "lora")
    merged = fastpeft.merge_and_unload(m)
    assert not fastpeft.sparse_layers(merged) and type(merged.layers[0].attn.q_proj) is nn.Linear


@pytest.mark.parametrize("b", [1, 8])
def test_sparse_adapter_files_round_trip(tmp_path, b):
    torch.manual_seed(0)
    m = Toy()
    fastpeft.inject(m, SparseDeltaConfig(density=0.2, block_size=b, selection="magnitude",
                                         target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in fastpeft.sparse_layers(m).values():
            layer.delta_values.normal_()
    x = torch.randn(2, 3, 16)
    fastpeft.save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "SPARSE_DELTA" and cfg["density"] == 0.2 and cfg["block_size"] == b
    keys = load_file(tmp_path / WEIGHTS_NAME)
    assert "base_model.model.layers.0.attn.q_proj.sparse_delta.indices" in keys
    torch.manual_seed(123)  # a different random draw: the load must take the file's positions
    fresh = Toy()
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if "delta" not in k})
    fastpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    for name, layer in fastpeft.sparse_layers(fresh).items():
        assert torch.equal(layer.delta_indices, fastpeft.sparse_layers(m)[name].delta_indices)


def test_bad_sparse_file_leaves_model_unchanged(tmp_path):
    m = Toy()
    fastpeft.inject(m, SparseDeltaConfig(density=0.2, target_modules=["q_proj"]))
    fastpeft.save_adapter(m, tmp_path)
    t = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.layers.0.attn.q_proj.sparse_delta.indices"
    t[key] = t[key].flip(0)  # unsorted
    save_file(t, tmp_path / WEIGHTS_NAME)
    fresh = Toy()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="sparse delta of 'layers.0.attn.q_proj'.*must be sorted"):
        fastpeft.load_adapter(fresh, tmp_path)
    assert not fastpeft.sparse_layers(fresh) and fresh.state_dict().keys() == before.keys()
    del t[key]
    save_file(t, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="missing keys"):
        fastpeft.load_adapter(fresh, tmp_path)


def test_lora_plus_sparse_rosa():
    torch.manual_seed(0)
    layer = FastLoRALinear(80, 48, r=4, lora_alpha=8, sparse_density=0.2, sparse_block_size=16,
                           init_lora_weights=False)
    idx, vals = layer.adapter_sparse_delta()
    assert idx.shape == (3, 2) and vals.shape == (3, 16, 16) and vals.requires_grad
    with torch.no_grad():
        vals.normal_()
    x = torch.randn(5, 80, requires_grad=True)
    layer.eval()
    y = layer(x)
    w_eff = layer.weight + dense_delta_ref(idx, vals, 48, 80, 16)
    expected = x @ w_eff.T + layer.bias + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert vals.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad is not None
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="cannot be routed per row"):
        layer(x, adapter_ids=torch.zeros(5, dtype=torch.long))


def test_rosa_through_lora_config_and_files(tmp_path):
    torch.manual_seed(0)
    m = Toy()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     sparse_density=0.1, sparse_block_size=1)
    fastpeft.inject(m, cfg)
    with torch.no_grad():
        for layer in fastpeft.lora_layers(m).values():
            layer.sparse_values["default"].normal_()
    trainable = {n.replace(".default", "").rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A_adapters", "lora_B_adapters", "delta_values"}
    x = torch.randn(3, 16)
    fastpeft.save_adapter(m, tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    # fastpeft's own type: PEFT would load the LoRA part alone, ignoring the sparse fields and keys
    assert saved["sparse_density"] == 0.1 and saved["peft_type"] == "ROSA"
    base = {k: v for k, v in m.state_dict().items() if "lora_" not in k and "sparse_" not in k}
    for peft_type in ("ROSA", "LORA"):  # files written before the type existed say "LORA": they load the same
        (tmp_path / CONFIG_NAME).write_text(json.dumps({**saved, "peft_type": peft_type}))
        torch.manual_seed(5)
        fresh = Toy()
        fresh.load_state_dict(base)
        fastpeft.load_adapter(fresh, tmp_path)
        torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    peft = pytest.importorskip("peft")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(saved))
    with pytest.raises(Exception, match="ROSA"):
        peft.PeftModel.from_pretrained(Toy(), tmp_path)


@pytest.mark.parametrize("kind", ["SparseDeltaConfig", "RoSA"])
def test_gradient_scores_are_accumulated_abs_dL_dW(kind):
    """select_by_gradients' scores are sum over batches of |dL/dW|, as torch.autograd.grad gives it, and the
    new positions are their top entries."""
    import copy

    torch.manual_seed(0)
    m = Toy()
    cfg = (SparseDeltaConfig(density=0.05, target_modules=["q_proj", "mlp.0"]) if kind == "SparseDeltaConfig" else
           LoraConfig(r=2, target_modules=["q_proj", "mlp.0"], init_lora_weights=False, sparse_density=0.05))
    fastpeft.inject(m, cfg)
    batches = [torch.randn(4, 16) for _ in range(3)]

    def loss_fn(model, xb):  # signs vary across batches and entries: |g| summed != |sum g|
        return model(xb).sin().sum()

    ref = copy.deepcopy(m)
    layers = {n: l for n, l in ref.named_modules() if isinstance(l, (SparseDeltaLinear, FastLoRALinear))}
    weights = [layers[n].weight.requires_grad_(True) for n in layers]
    expected = {n: torch.zeros_like(w) for n, w in zip(layers, weights)}
    for xb in batches:
        for n, g in zip(layers, torch.autograd.grad(loss_fn(ref, xb), weights)):
            expected[n] += g.abs()
    scores = fastpeft.select_by_gradients(m, batches, loss_fn, progress=False)
    assert sorted(scores) == sorted(expected)
    # the saved config says the positions came from scores (before 2026-12-01 it kept "random")
    field = "selection" if kind == "SparseDeltaConfig" else "sparse_selection"
    assert getattr(adapter_configs(m)["default"], field) == "scores"
    for n, layer in {**fastpeft.sparse_layers(m), **fastpeft.lora_layers(m)}.items():
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-5, atol=1e-6)
        idx, values = layer.sparse_delta().delta_indices, layer.sparse_delta().delta_values
        top = torch.sort(torch.topk(expected[n].reshape(-1), values.numel()).indices).values
        assert torch.equal(idx, top)


def test_one_shot_gradient_selection():
    torch.manual_seed(0)
    m = Toy()
    fastpeft.inject(m, SparseDeltaConfig(density=0.05, target_modules=["q_proj"]))
    batches = [torch.randn(4, 16) for _ in range(3)]
    scores = fastpeft.select_by_gradients(m, batches, lambda model, xb: model(xb).square().mean(), progress=False)
    for name, layer in fastpeft.sparse_layers(m).items():
        expected = torch.sort(torch.topk(scores[name].reshape(-1), layer.delta_values.numel()).indices).values
        assert torch.equal(layer.delta_indices, expected)
        assert not layer.weight.requires_grad and layer.weight.grad is None
        assert torch.count_nonzero(layer.delta_values) == 0
    with pytest.raises(ValueError, match="no sparse deltas"):
        fastpeft.select_by_gradients(Toy(), batches, lambda model, xb: model(xb).sum())


@pytest.mark.parametrize("kind", ["SparseDeltaConfig", "RoSA"])
def test_blocks_covering_far_more_than_the_density_are_warned_of(kind):
    """Blocks of 32 on Toy's 16-wide layers: at least one block each covers all of W (16 x 16) or half of it
    (32 x 16), far above a density of 1 %: a warning names the layers and the worst share; blocks that fit give
    none."""
    def cfg(block):
        targets = ["q_proj", "mlp.0"]
        return (SparseDeltaConfig(density=0.01, block_size=block, target_modules=targets) if kind == "SparseDeltaConfig"
                else LoraConfig(r=2, target_modules=targets, sparse_density=0.01, sparse_block_size=block))
    with pytest.warns(UserWarning, match=r"blocks of 32 cover more of W than density 0.01 asks for in 4 layers .*"
                                         r"100.0%") as caught:
        m = fastpeft.inject(Toy(), cfg(32))
    assert {w.filename for w in caught} == {__file__}  # the user's line
    import tempfile
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.inject(Toy(), cfg(1))
        with tempfile.TemporaryDirectory() as d:  # a load: the file's positions, nothing left to choose
            fastpeft.save_adapter(m, d)
            fastpeft.load_adapter(Toy(), d)
        fastpeft.inject(nn.Sequential(nn.Linear(512, 512)), SparseDeltaConfig(density=0.01, block_size=16,
                                                                             target_modules=["0"]))
