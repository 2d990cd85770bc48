"""Bad inputs across the public API, as tables (API.md: "bad arguments raise at once with a message naming
the argument, the expected and the given value").

Each row names a call, the exception it must raise (that exact type) and the words its message must hold:
the argument's name and, where it helps, the expected and the given value. A call on a layer or a model
must leave it bit for bit as it was (parameters, buffers, modules, trainable flags, adapter registry).
Adapter files: every broken folder raises before the model changes; a save that fails midway leaves the
target folder as it was, and no temporary folder behind.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft import (AdapterConfig, BitFitConfig, FastLoRALinear, LayerwiseConfig, LoraConfig, PromptTuningConfig,
                      SparseDeltaConfig, SparseDeltaLinear)
from fastpeft.inject import adapter_configs
from fastpeft.io import CONFIG_NAME, WEIGHTS_NAME
from test_io import _toy, _trained as _lora_model  # toy with LoRA r=4 on q/v, weights made non-zero

IN, OUT, R = 16, 24, 4  # every functional case: x (3, IN), weight (OUT, IN), lora_A (R, IN), lora_B (OUT, R)


# ---- what the cases run on ------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _lora(**over):
    args = dict(x=_t(3, IN), weight=_t(OUT, IN), bias=_t(OUT), lora_A=_t(R, IN), lora_B=_t(OUT, R), scaling=2.0)
    return fastpeft.lora_linear(**{**args, **over})


def _multi(**over):
    """Two adapters of r_max=R; x (3, IN), one id per row."""
    args = dict(x=_t(3, IN), weight=_t(OUT, IN), bias=None, lora_A_stack=_t(2, R, IN), lora_B_stack=_t(2, OUT, R),
                scalings=torch.ones(2), adapter_ids=torch.tensor([0, 1, -1]))
    return fastpeft.lora_linear_multi(**{**args, **over})


def _sparse(**over):
    """Three entries of a (OUT, IN) = (24, 16) weight: 384 flat positions; in blocks of 8, 3 x 2 blocks."""
    args = dict(x=_t(3, IN), weight=_t(OUT, IN), bias=None, delta_indices=torch.tensor([1, 5, 40]),
                delta_values=torch.ones(3))
    return fastpeft.sparse_delta_linear(**{**args, **over})


def _bench_plot(content, *extra):
    """``fastpeft bench plot`` on a file holding ``content`` (JSON-encoded), in a temporary folder."""
    import tempfile

    from fastpeft.cli import main

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.json")
        with open(path, "w") as f:
            json.dump(content, f)
        return main(["bench", "plot", path, *extra])


def _blocks(indices, values=None):
    idx = torch.tensor(indices)
    return _sparse(delta_indices=idx, delta_values=torch.ones(idx.shape[0], 8, 8) if values is None else values,
                   block_size=8)


def _layer():
    """FastLoRALinear(IN, OUT) with adapters "default" (r=4, active) and "second" (r=2): ids 0 and 1."""
    torch.manual_seed(0)
    layer = FastLoRALinear(IN, OUT, r=R, lora_alpha=8, init_lora_weights=False)
    layer.add_adapter("second", 2, 4, init_lora_weights=False)
    return layer


def _sparse_layer():
    torch.manual_seed(0)
    return SparseDeltaLinear(IN, OUT, density=0.1)


def _on_triton(module, x):
    with fastpeft.use_backend("triton"):
        return module(x)


def _t5():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0))


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=16))


def _gpt2_own_conv1d():
    """GPT-2 whose c_attn is a Conv1D subclass with a forward of its own."""
    m = _gpt2()
    conv = type(m.transformer.h[0].attn.c_attn)
    m.transformer.h[0].attn.c_attn.__class__ = type("ScaledConv1D", (conv,),
                                                    {"forward": lambda self, x: 2 * conv.forward(self, x)})
    return m


class _ScaledWithExtra(nn.Embedding):
    """A scaled embedding that also overwrites a row with a Parameter of its own (T5Gemma 2's eoi row)."""

    def __init__(self, n, d):
        super().__init__(n, d)
        self.embed_scale = 2.0
        self.extra = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return torch.where((x == 1)[..., None], self.extra, super().forward(x) * self.embed_scale)


def _embedding_with_dora():
    torch.manual_seed(0)
    layer = fastpeft.FastLoRAEmbedding.from_embedding(nn.Embedding(9, 4))
    layer.add_adapter("d", 2, 2, use_dora=True)
    return layer


def _merged_model():
    m = _lora_model()
    for layer in fastpeft.lora_layers(m).values():
        layer.merge()
    return m


def _bitfit_model():
    return fastpeft.inject(_toy(), BitFitConfig())


def _mixed(model, names, x):
    with fastpeft.mixed_batch(model, names):
        model(x)


# ---- bit-for-bit snapshots --------------------------------------------------------------------------

def _bits(t: torch.Tensor) -> tuple:
    t = t.detach()
    return t.dtype, tuple(t.shape), t.device, t.contiguous().reshape(-1).view(torch.uint8).clone()


def _registry(module: nn.Module) -> list:
    """Adapter bookkeeping that no tensor holds: the model's adapters and each layer's."""
    out = [sorted(adapter_configs(module)), fastpeft.active_adapter(module)]
    for name, m in module.named_modules():
        if isinstance(m, FastLoRALinear):
            out.append((name, m.adapter_names, m.active_adapter, m.merged,
                        [m.adapter_spec(n) for n in m.adapter_names]))
        elif isinstance(m, SparseDeltaLinear):
            out.append((name, m.merged, m.selection))
    return out


def _snapshot(module: nn.Module):
    return ({k: _bits(v) for k, v in module.state_dict(keep_vars=True).items()},
            [(n, type(m).__name__) for n, m in module.named_modules()],
            [(n, p.requires_grad) for n, p in module.named_parameters()],
            _registry(module))


def _assert_unchanged(module: nn.Module, before) -> None:
    state, modules, flags, registry = before
    now = _snapshot(module)
    assert now[1] == modules, "the modules changed"
    assert now[2] == flags, "the trainable flags changed"
    assert now[3] == registry, "the adapter registry changed"
    assert set(now[0]) == set(state), f"state_dict keys changed: {set(now[0]) ^ set(state)}"
    changed = [k for k, (dt, shape, dev, b) in state.items()
               if now[0][k][:3] != (dt, shape, dev) or not torch.equal(now[0][k][3], b)]
    assert not changed, f"tensors changed: {changed}"


def _assert_unique_ids(*tables) -> None:
    ids = [c.id for table in tables for c in table]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def _skip_without_bitsandbytes() -> None:
    from fastpeft.quant import import_bitsandbytes

    try:
        import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed")


def _assert_message(excinfo, exc, words) -> None:
    assert excinfo.type is exc, f"raised {excinfo.type.__name__} ({excinfo.value}), expected {exc.__name__}"
    msg = str(excinfo.value)
    missing = [w for w in words if w not in msg]
    assert not missing, f"the message {msg!r} lacks {missing}"


# ---- the table of calls ------------------------------------------------------------------------------

@dataclass
class Bad:
    id: str
    call: Callable                    # call(obj), obj = make() or None
    exc: type
    words: tuple                      # the message holds each of these
    make: Optional[Callable] = None   # the layer / model the call acts on; checked unchanged afterwards


IDS3 = dict(x=_t(3, 5, IN))  # a (batch 3, seq 5) input for per-row / per-sequence ids

CASES = [
    # -- lora_linear: shapes
    Bad("lora_linear-x-last-dim-15", lambda _: _lora(x=_t(3, 15)), ValueError,
        ("x's last dim", "in_features=16", "got 15")),
    Bad("lora_linear-x-0d", lambda _: _lora(x=torch.tensor(1.0)), ValueError, ("x's last dim", "0-d")),
    Bad("lora_linear-lora_A-in-15", lambda _: _lora(lora_A=_t(R, 15)), ValueError, ("lora_A", "(4, 16)", "(4, 15)")),
    Bad("lora_linear-lora_B-rank-3-vs-A-rank-4", lambda _: _lora(lora_B=_t(OUT, 3)), ValueError,
        ("lora_B", "(24, 4)", "(24, 3)")),
    Bad("lora_linear-bias-len-23", lambda _: _lora(bias=_t(23)), ValueError, ("bias", "(24,)", "(23,)")),
    Bad("lora_linear-weight-not-a-tensor", lambda _: _lora(weight=[[1.0] * IN] * OUT), TypeError, ("weight", "list")),
    # -- lora_linear: dtypes and devices
    Bad("lora_linear-x-int64", lambda _: _lora(x=torch.ones(3, IN, dtype=torch.int64)), ValueError,
        ("x must be float32", "torch.int64")),
    Bad("lora_linear-x-fp32-weight-fp64", lambda _: _lora(weight=_t(OUT, IN, dtype=torch.float64)), ValueError,
        ("weight", "torch.float32", "torch.float64")),
    Bad("lora_linear-lora_B-bf16", lambda _: _lora(lora_B=_t(OUT, R, dtype=torch.bfloat16)), ValueError,
        ("lora_B", "torch.float32", "torch.bfloat16")),
    Bad("lora_linear-weight-on-meta", lambda _: _lora(weight=_t(OUT, IN, device="meta")), ValueError,
        ("weight", "device cpu", "meta")),
    Bad("lora_linear-x-on-meta", lambda _: _lora(x=_t(3, IN, device="meta")), ValueError, ("device meta", "cpu")),
    # -- lora_linear: scaling, dropout, seed, backend
    Bad("lora_linear-scaling-nan", lambda _: _lora(scaling=float("nan")), ValueError, ("scaling", "finite", "nan")),
    Bad("lora_linear-scaling-str", lambda _: _lora(scaling="2"), ValueError, ("scaling", "'2'")),
    Bad("lora_linear-scaling-tensor", lambda _: _lora(scaling=torch.tensor(2.0)), TypeError, ("scaling", "tensor")),
    Bad("lora_linear-dropout_p-1.0", lambda _: _lora(dropout_p=1.0), ValueError, ("dropout_p", "[0, 1)", "1.0")),
    Bad("lora_linear-dropout_p--0.1", lambda _: _lora(dropout_p=-0.1), ValueError, ("dropout_p", "-0.1")),
    Bad("lora_linear-dropout_p-str", lambda _: _lora(dropout_p="0.1"), ValueError, ("dropout_p", "'0.1'")),
    Bad("lora_linear-seed--1", lambda _: _lora(dropout_p=0.1, seed=-1), ValueError, ("seed", "-1")),
    Bad("lora_linear-backend-cuda", lambda _: _lora(backend="cuda"), ValueError, ("backend", "'cuda'")),
    # -- FastLoRALinear: construction (rank, dropout, alpha, init, sizes)
    Bad("FastLoRALinear-r-0", lambda _: FastLoRALinear(IN, OUT, r=0), ValueError, ("r must be a positive int", "0")),
    Bad("FastLoRALinear-r--2", lambda _: FastLoRALinear(IN, OUT, r=-2), ValueError, ("r must be", "-2")),
    Bad("FastLoRALinear-r-2.5", lambda _: FastLoRALinear(IN, OUT, r=2.5), ValueError, ("r must be", "2.5")),
    Bad("FastLoRALinear-r-True", lambda _: FastLoRALinear(IN, OUT, r=True), ValueError, ("r must be", "True")),
    Bad("FastLoRALinear-lora_dropout-1.0", lambda _: FastLoRALinear(IN, OUT, lora_dropout=1.0), ValueError,
        ("lora_dropout", "[0, 1)", "1.0")),
    Bad("FastLoRALinear-lora_dropout--0.1", lambda _: FastLoRALinear(IN, OUT, lora_dropout=-0.1), ValueError,
        ("lora_dropout", "-0.1")),
    Bad("FastLoRALinear-lora_dropout-str", lambda _: FastLoRALinear(IN, OUT, lora_dropout="0.1"), ValueError,
        ("lora_dropout", "'0.1'")),
    Bad("FastLoRALinear-lora_alpha-inf", lambda _: FastLoRALinear(IN, OUT, lora_alpha=float("inf")), ValueError,
        ("lora_alpha", "inf")),
    Bad("FastLoRALinear-init-corda", lambda _: FastLoRALinear(IN, OUT, init_lora_weights="corda"), ValueError,
        ("init_lora_weights", "'corda'")),
    Bad("FastLoRALinear-init-pissa-niter-word", lambda _: FastLoRALinear(IN, OUT, init_lora_weights="pissa_niter_x"),
        ValueError, ("init_lora_weights", "'pissa_niter_x'")),
    Bad("FastLoRALinear-in_features-0", lambda _: FastLoRALinear(0, OUT), ValueError, ("in_features", "0")),
    Bad("FastLoRAEmbedding-from_embedding-linear", lambda _: fastpeft.FastLoRAEmbedding.from_embedding(nn.Linear(4, 4)),
        TypeError, ("embedding must be an nn.Embedding", "Linear")),
    Bad("FastLoRAEmbedding-from_embedding-max_norm",
        lambda _: fastpeft.FastLoRAEmbedding.from_embedding(nn.Embedding(9, 4, max_norm=2.0)), ValueError,
        ("max_norm=2.0", "max_norm=None only")),
    Bad("FastLoRAEmbedding-forward-float-ids", lambda m: m(_t(2, 3)), TypeError,
        ("int64 / int32 tensor of ids", "[0, 9)", "torch.float32"),
        lambda: fastpeft.FastLoRAEmbedding.from_embedding(nn.Embedding(9, 4))),
    Bad("inject-embedding-rosa", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["wte"], sparse_density=0.1)),
        ValueError, ("'transformer.wte'", "embedding layer", "not a sparse delta"), _gpt2),
    Bad("FastLoRAEmbedding-scaled-with-extra-parameter", lambda _: fastpeft.FastLoRAEmbedding.from_embedding(
        _ScaledWithExtra(9, 4)), TypeError, ("_ScaledWithExtra", "plain transformers scaled embedding")),
    Bad("FastLoRAEmbedding-dora-routed", lambda m: m(torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])),
        ValueError, ("DoRA", "'d'", "routed per row"), _embedding_with_dora),
    Bad("FastLoRALinear-from_conv1d-linear", lambda _: FastLoRALinear.from_conv1d(nn.Linear(4, 4)), TypeError,
        ("conv must be a transformers Conv1D", "Linear")),
    Bad("inject-conv1d-rosa", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["c_attn"], sparse_density=0.01)),
        ValueError, ("'transformer.h.0.attn.c_attn'", "Conv1D", "not a sparse delta", "sparse_density=0"), _gpt2),
    Bad("inject-conv1d-sparse-delta",
        lambda m: fastpeft.inject(m, fastpeft.SparseDeltaConfig(target_modules=["c_attn"])), ValueError,
        ("'transformer.h.0.attn.c_attn'", "Conv1D", "not a sparse delta"), _gpt2),
    Bad("inject-conv1d-own-forward", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["c_attn", "c_proj"])),
        ValueError, ("'transformer.h.0.attn.c_attn'", "ScaledConv1D", "forward of its own"), _gpt2_own_conv1d),
    Bad("FastLoRALinear-from_linear-conv", lambda _: FastLoRALinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError,
        ("linear", "Conv1d")),
    # -- FastLoRALinear: forward inputs
    Bad("layer-x-last-dim-15", lambda m: m(_t(3, 15)), ValueError, ("in_features=16", "got 15"), _layer),
    Bad("layer-x-0d", lambda m: m(torch.tensor(1.0)), ValueError, ("in_features=16", "0-d"), _layer),
    Bad("layer-x-int64", lambda m: m(torch.ones(3, IN, dtype=torch.int64)), ValueError, ("x must be", "torch.int64"),
        _layer),
    Bad("layer-x-fp64", lambda m: m(_t(3, IN, dtype=torch.float64)), ValueError,
        ("dtype torch.float64", "torch.float32"), _layer),
    Bad("layer-x-on-meta", lambda m: m(_t(3, IN, device="meta")), ValueError, ("device meta", "cpu"), _layer),
    # -- FastLoRALinear(x, adapter_ids): 2 adapters, ids in [-1, 1]
    Bad("ids-2-out-of-range", lambda m: m(**IDS3, adapter_ids=torch.tensor([0, 2, 1])), ValueError,
        ("adapter_ids", "[-1, 1]", "[0, 2]"), _layer),
    Bad("ids--2-below-base", lambda m: m(**IDS3, adapter_ids=torch.tensor([-2, 0, 1])), ValueError,
        ("adapter_ids", "[-1, 1]", "[-2, 1]"), _layer),
    Bad("ids-float32", lambda m: m(**IDS3, adapter_ids=torch.zeros(3)), TypeError, ("adapter_ids", "torch.float32"),
        _layer),
    Bad("ids-python-list", lambda m: m(**IDS3, adapter_ids=[0, 1, 0]), TypeError, ("adapter_ids", "list"), _layer),
    Bad("ids-length-4-for-batch-3", lambda m: m(**IDS3, adapter_ids=torch.zeros(4, dtype=torch.long)), ValueError,
        ("adapter_ids", "(3, 5)", "(3,)", "got (4,)"), _layer),
    Bad("ids-shape-5x3-for-3x5", lambda m: m(**IDS3, adapter_ids=torch.zeros(5, 3, dtype=torch.long)), ValueError,
        ("adapter_ids", "(3, 5)", "got (5, 3)"), _layer),
    Bad("ids-on-meta", lambda m: m(**IDS3, adapter_ids=torch.zeros(3, dtype=torch.long, device="meta")), ValueError,
        ("adapter_ids", "device cpu", "meta"), _layer),
    # -- FastLoRALinear: the adapter registry
    Bad("add_adapter-existing-name", lambda m: m.add_adapter("second", 2, 4), ValueError,
        ("'second'", "already exists"), _layer),
    Bad("add_adapter-dotted-name", lambda m: m.add_adapter("a.b", 2, 4), ValueError, ("adapter name", "'a.b'"),
        _layer),
    Bad("add_adapter-r-0", lambda m: m.add_adapter("third", 0, 4), ValueError, ("r must be", "0"), _layer),
    Bad("add_adapter-lora_dropout-1.5", lambda m: m.add_adapter("third", 2, 4, lora_dropout=1.5), ValueError,
        ("lora_dropout", "1.5"), _layer),
    Bad("add_adapter-scores-without-scores", lambda m: m.add_adapter("third", 2, 4, sparse_density=0.1,
                                                                      sparse_selection="scores"), ValueError,
        ("scores", "None"), _layer),
    Bad("layer-set_adapter-unknown", lambda m: m.set_adapter("nope"), ValueError, ("'nope'", "'default', 'second'"),
        _layer),
    Bad("layer-delete_adapter-unknown", lambda m: m.delete_adapter("nope"), ValueError, ("'nope'", "'second'"),
        _layer),
    Bad("layer-lora_dropout-setter-1.5", lambda m: setattr(m, "lora_dropout", 1.5), ValueError,
        ("lora_dropout", "1.5"), _layer),
    # -- lora_linear_multi: 2 adapters of r_max 4
    Bad("multi-ids-2-out-of-range", lambda _: _multi(adapter_ids=torch.tensor([0, 1, 2])), ValueError,
        ("adapter_ids", "[-1, 1]", "[0, 2]")),
    Bad("multi-ids-int8", lambda _: _multi(adapter_ids=torch.zeros(3, dtype=torch.int8)), TypeError,
        ("adapter_ids", "torch.int8")),
    Bad("multi-ids-None", lambda _: _multi(adapter_ids=None), TypeError, ("adapter_ids", "NoneType")),
    Bad("multi-ids-length-4", lambda _: _multi(adapter_ids=torch.zeros(4, dtype=torch.long)), ValueError,
        ("adapter_ids", "(3,)", "got (4,)")),
    Bad("multi-lora_B_stack-rank-3", lambda _: _multi(lora_B_stack=_t(2, OUT, 3)), ValueError,
        ("lora_B_stack", "(2, 24, 4)", "(2, 24, 3)")),
    Bad("multi-lora_A_stack-2d", lambda _: _multi(lora_A_stack=_t(R, IN)), ValueError, ("lora_A_stack", "3-D", "2-D")),
    Bad("multi-scalings-length-3", lambda _: _multi(scalings=torch.ones(3)), ValueError, ("scalings", "(2,)", "(3,)")),
    Bad("multi-ranks-5-over-r_max", lambda _: _multi(ranks=torch.tensor([4, 5])), ValueError,
        ("ranks", "r_max=4", "[4, 5]")),
    Bad("multi-ranks-0", lambda _: _multi(ranks=torch.tensor([0, 4])), ValueError, ("ranks", "[1, r_max=4]", "[0, 4]")),
    Bad("multi-x-fp64", lambda _: _multi(x=_t(3, IN, dtype=torch.float64)), ValueError,
        ("dtype torch.float64", "torch.float32")),
    Bad("multi-env-path-fastest", lambda _: _with_env("FASTPEFT_MULTI_PATH", "fastest",
                                                      lambda: _multi(backend="triton")), ValueError,
        ("FASTPEFT_MULTI_PATH", "'bgmv'", "'fastest'")),
    Bad("multi-env-path-fused-r_max-80", lambda _: _with_env("FASTPEFT_MULTI_PATH", "fused", lambda: _multi(
        lora_A_stack=_t(2, 80, IN), lora_B_stack=_t(2, OUT, 80), backend="triton", training=False)), ValueError,
        ("FASTPEFT_MULTI_PATH=fused", "cannot run here", "r_max 80 is above 64")),
    # -- sparse_delta_linear, block_size 1: flat indices into 24 x 16 = 384 entries
    Bad("sparse-index-384-out-of-range", lambda _: _sparse(delta_indices=torch.tensor([1, 5, 384])), ValueError,
        ("delta_indices", "[0, 384)", "[1, 384]")),
    Bad("sparse-index--1", lambda _: _sparse(delta_indices=torch.tensor([-1, 5, 40])), ValueError,
        ("delta_indices", "[0, 384)", "[-1, 40]")),
    Bad("sparse-unsorted", lambda _: _sparse(delta_indices=torch.tensor([1, 40, 5])), ValueError,
        ("delta_indices", "sorted", "40 at position 1 before 5")),
    Bad("sparse-duplicate", lambda _: _sparse(delta_indices=torch.tensor([1, 5, 5])), ValueError,
        ("delta_indices", "unique", "5 twice")),
    Bad("sparse-values-4-for-3-indices", lambda _: _sparse(delta_values=torch.ones(4)), ValueError,
        ("delta_values", "(3,)", "(4,)")),
    Bad("sparse-indices-float", lambda _: _sparse(delta_indices=torch.tensor([1.0, 5.0, 40.0])), TypeError,
        ("delta_indices", "torch.float32")),
    Bad("sparse-indices-2d-for-block_size-1", lambda _: _sparse(delta_indices=torch.tensor([[1, 5, 40]])), ValueError,
        ("delta_indices", "1-D", "(1, 3)")),
    Bad("sparse-values-int64", lambda _: _sparse(delta_values=torch.ones(3, dtype=torch.int64)), TypeError,
        ("delta_values", "floating-point", "torch.int64")),
    Bad("sparse-values-fp64", lambda _: _sparse(delta_values=torch.ones(3, dtype=torch.float64)), ValueError,
        ("delta_values", "torch.float32", "torch.float64")),
    Bad("sparse-values-on-meta", lambda _: _sparse(delta_values=torch.ones(3, device="meta")), ValueError,
        ("delta_values", "cpu", "meta")),
    Bad("sparse-weight-not-a-tensor", lambda _: _sparse(weight="w"), TypeError, ("weight", "str")),
    Bad("sparse-block_size-0", lambda _: _sparse(block_size=0), ValueError, ("block_size", "positive int", "0")),
    # -- sparse_delta_linear, block_size 8: 3 block rows x 2 block columns
    Bad("sparse-block-row-3-of-3", lambda _: _blocks([[0, 0], [3, 1]]), ValueError,
        ("delta_indices' block rows", "[0, 3)", "[0, 3]")),
    Bad("sparse-block-col-2-of-2", lambda _: _blocks([[0, 0], [1, 2]]), ValueError,
        ("delta_indices' block columns", "[0, 2)", "[0, 2]")),
    Bad("sparse-block-unsorted", lambda _: _blocks([[1, 0], [0, 1]]), ValueError,
        ("delta_indices", "sorted", "(1, 0) at position 0 before (0, 1)")),
    Bad("sparse-block-duplicate", lambda _: _blocks([[1, 0], [1, 0]]), ValueError, ("delta_indices", "(1, 0) twice")),
    Bad("sparse-block-coords-3-wide", lambda _: _blocks([[0, 0, 0], [1, 1, 1]]), ValueError,
        ("delta_indices", "(nblocks, 2)", "(2, 3)")),
    Bad("sparse-block-values-4x4", lambda _: _blocks([[0, 0], [1, 1]], torch.ones(2, 4, 4)), ValueError,
        ("delta_values", "(2, 8, 8)", "(2, 4, 4)")),
    # -- the LoRA paths' switch forcing a fused TMA path that cannot run (rank 65: above what its configs hold)
    Bad("lora-env-FASTPEFT_LORA_GEMM-tma-shrink-rank-65",
        lambda _: _with_env("FASTPEFT_LORA_GEMM", "tma-shrink",
                            lambda: _lora(lora_A=_t(65, IN), lora_B=_t(OUT, 65), backend="triton")), ValueError,
        ("'tma-shrink'", "cannot run here", "('kernels', 'torch', 'decode')")),
    # -- fastpeft bench plot: a file that is not a bench table, --out for two files
    Bad("cli-bench-plot-no-rows", lambda _: _bench_plot({"rows": []}), SystemExit,
        ("bench.json", "non-empty list of rows", "0 rows")),
    Bad("cli-bench-plot-rows-without-ratio", lambda _: _bench_plot({"rows": [{"provider": "linear"}]}), SystemExit,
        ("bench.json", "'vs_<baseline>'", "got ratio columns []")),
    Bad("cli-bench-plot-out-with-two-files", lambda _: _bench_plot({"rows": []}, "second.json", "--out", "x.png"),
        SystemExit, ("--out takes one JSON file", "got 2")),
    # -- the sparse GEMM switch forcing the TMA path where it cannot run (blocks of 128: it takes 16 to 64)
    Bad("sparse-env-FASTPEFT_SPARSE_GEMM-tma-block-128",
        lambda _: _with_env("FASTPEFT_SPARSE_GEMM", "tma", lambda: _sparse(
            delta_indices=torch.tensor([[0, 0]]), delta_values=torch.ones(1, 128, 128), block_size=128,
            backend="triton")), ValueError, ("'tma'", "cannot run here", "('fused', 'dense')")),
    # -- the sparse ops' floor switch (read on the triton backend, where the choice is made)
    Bad("sparse-env-FASTPEFT_SPARSE_PATH-fastest",
        lambda _: _with_env("FASTPEFT_SPARSE_PATH", "fastest", lambda: _sparse(backend="triton")), ValueError,
        ("FASTPEFT_SPARSE_PATH", "('auto', 'kernels', 'torch')", "'fastest'")),
    Bad("SparseDeltaLinear-env-FASTPEFT_SPARSE_PATH-cublas",
        lambda m: _with_env("FASTPEFT_SPARSE_PATH", "cublas", lambda: _on_triton(m, _t(3, IN))), ValueError,
        ("FASTPEFT_SPARSE_PATH", "('auto', 'kernels', 'torch')", "'cublas'"), _sparse_layer),
    # -- SparseDeltaLinear
    Bad("SparseDeltaLinear-set_delta-unsorted", lambda m: m.set_delta(torch.tensor([9, 3])), ValueError,
        ("delta_indices", "sorted", "9 at position 0 before 3"), _sparse_layer),
    Bad("SparseDeltaLinear-set_delta-values-3-for-2", lambda m: m.set_delta(torch.tensor([3, 9]), torch.ones(3)),
        ValueError, ("delta_values", "(2,)", "(3,)"), _sparse_layer),
    Bad("SparseDeltaLinear-set_delta-int-values", lambda m: m.set_delta(torch.tensor([3, 9]), torch.ones(2).long()),
        TypeError, ("delta_values", "torch.int64"), _sparse_layer),
    Bad("SparseDeltaLinear-reselect-best", lambda m: m.reselect("best"), ValueError, ("selection", "'best'"),
        _sparse_layer),
    Bad("SparseDeltaLinear-x-last-dim-15", lambda m: m(_t(2, 15)), ValueError, ("in_features=16", "got 15"),
        _sparse_layer),
    Bad("SparseDeltaLinear-scores-without-scores", lambda _: SparseDeltaLinear(IN, OUT, selection="scores"),
        ValueError, ("scores", "None")),
    # -- densities
    Bad("SparseDeltaLinear-density-0", lambda _: SparseDeltaLinear(IN, OUT, density=0), ValueError,
        ("density", "(0, 1]", "got 0")),
    Bad("SparseDeltaLinear-density-1.5", lambda _: SparseDeltaLinear(IN, OUT, density=1.5), ValueError,
        ("density", "(0, 1]", "1.5")),
    Bad("SparseDeltaConfig-density-0", lambda _: SparseDeltaConfig(density=0.0), ValueError, ("density", "0.0")),
    Bad("SparseDeltaConfig-density-str", lambda _: SparseDeltaConfig(density="0.1"), ValueError, ("density", "'0.1'")),
    Bad("SparseDeltaConfig-selection-best", lambda _: SparseDeltaConfig(selection="best"), ValueError,
        ("selection", "'random'", "'best'")),
    Bad("SparseDeltaConfig-block_size-0", lambda _: SparseDeltaConfig(block_size=0), ValueError, ("block_size", "0")),
    Bad("LoraConfig-sparse_density-1.5", lambda _: LoraConfig(sparse_density=1.5), ValueError,
        ("sparse_density", "[0, 1]", "1.5")),
    Bad("LoraConfig-sparse_density--0.1", lambda _: LoraConfig(sparse_density=-0.1), ValueError,
        ("sparse_density", "-0.1")),
    # -- configs
    Bad("LoraConfig-sparse_block_size-0", lambda _: LoraConfig(sparse_density=0.1, sparse_block_size=0), ValueError,
        ("sparse_block_size must be a positive int", "0")),
    Bad("LoraConfig-sparse_selection-best", lambda _: LoraConfig(sparse_density=0.1, sparse_selection="best"),
        ValueError, ("sparse_selection", "'best'")),
    Bad("FastLoRALinear-sparse_block_size-0", lambda _: FastLoRALinear(8, 8, sparse_density=0.1, sparse_block_size=0),
        ValueError, ("sparse_block_size must be a positive int", "0")),
    Bad("LoraConfig-r-0", lambda _: LoraConfig(r=0), ValueError, ("r must be a positive int", "0")),
    Bad("LoraConfig-r-str", lambda _: LoraConfig(r="8"), ValueError, ("r must be", "'8'")),
    Bad("LoraConfig-lora_dropout-1.0", lambda _: LoraConfig(lora_dropout=1.0), ValueError, ("lora_dropout", "1.0")),
    Bad("LoraConfig-lora_alpha-nan", lambda _: LoraConfig(lora_alpha=float("nan")), ValueError, ("lora_alpha", "nan")),
    Bad("LoraConfig-bias-some", lambda _: LoraConfig(bias="some"), ValueError, ("bias", "'lora_only'", "'some'")),
    Bad("LoraConfig-task_type-unknown", lambda _: LoraConfig(task_type="CLS"), ValueError,
        ("task_type", "'SEQ_CLS'", "'CLS'")),
    Bad("LoraConfig-use_rslora-str", lambda _: LoraConfig(use_rslora="yes"), TypeError, ("use_rslora", "str")),
    Bad("LoraConfig-init-mica", lambda _: LoraConfig(init_lora_weights="mica"), ValueError,
        ("init_lora_weights", "'mica'")),
    Bad("LoraConfig-target_modules-int", lambda _: LoraConfig(target_modules=5), TypeError, ("target_modules", "int")),
    Bad("LoraConfig-target_modules-empty-list", lambda _: LoraConfig(target_modules=[]), ValueError,
        ("target_modules", "non-empty", "[]")),
    Bad("LoraConfig-target_modules-bad-regex", lambda _: LoraConfig(target_modules="q_proj("), ValueError,
        ("target_modules", "'q_proj('", "regex")),
    Bad("LoraConfig-rank_pattern-0", lambda _: LoraConfig(rank_pattern={"q_proj": 0}), ValueError,
        ("rank_pattern['q_proj']", "0")),
    Bad("LoraConfig-alpha_pattern-str", lambda _: LoraConfig(alpha_pattern={"q_proj": "big"}), ValueError,
        ("alpha_pattern['q_proj']", "'big'")),
    Bad("LoraConfig-rank_pattern-list", lambda _: LoraConfig(rank_pattern=[("q_proj", 2)]), TypeError,
        ("rank_pattern", "list")),
    Bad("LoraConfig-layers_to_transform-negative", lambda _: LoraConfig(target_modules=["q_proj"],
                                                                      layers_to_transform=[1, -1]), ValueError,
        ("layers_to_transform", "int >= 0", "[1, -1]")),
    Bad("LoraConfig-layers_to_transform-bool", lambda _: LoraConfig(layers_to_transform=True), ValueError,
        ("layers_to_transform", "True")),
    Bad("LoraConfig-layers_pattern-alone", lambda _: LoraConfig(layers_pattern="layers"), ValueError,
        ("layers_pattern='layers'", "needs layers_to_transform")),
    Bad("LoraConfig-layers_pattern-bad-regex", lambda _: LoraConfig(layers_to_transform=0, layers_pattern="a("),
        ValueError, ("layers_pattern", "'a('", "regex")),
    Bad("LoraConfig-layers_to_transform-regex-targets", lambda _: LoraConfig(target_modules=r".*q_proj",
                                                                           layers_to_transform=0), ValueError,
        ("layers_to_transform", "regex target_modules", "'.*q_proj'")),
    Bad("LoraConfig-trainable_token_indices-repeats", lambda _: LoraConfig(trainable_token_indices=[4, 2, 4]),
        ValueError, ("trainable_token_indices", "more than once", "[4]")),
    Bad("LoraConfig-trainable_token_indices-negative", lambda _: LoraConfig(trainable_token_indices=[1, -2]),
        ValueError, ("trainable_token_indices", "ints >= 0", "[1, -2]")),
    Bad("LoraConfig-trainable_token_indices-empty", lambda _: LoraConfig(trainable_token_indices=[]), ValueError,
        ("trainable_token_indices", "non-empty", "[]")),
    Bad("LoraConfig-trainable_token_indices-dict-of-str", lambda _: LoraConfig(
        trainable_token_indices={"embed_tokens": "1,2"}), ValueError, ("trainable_token_indices['embed_tokens']",
                                                                      "'1,2'")),
    Bad("LoraConfig-trainable_token_indices-dict-int-key", lambda _: LoraConfig(trainable_token_indices={0: [1]}),
        ValueError, ("trainable_token_indices", "module names", "{0: [1]}")),
    Bad("LoraConfig-inference_mode-str", lambda _: LoraConfig(inference_mode="yes"), TypeError,
        ("inference_mode", "'yes'")),
    Bad("LoraConfig-ensure_weight_tying", lambda _: LoraConfig(ensure_weight_tying=True), ValueError,
        ("ensure_weight_tying=True", "not supported", "leave it False")),
    Bad("LoraConfig-init-lora_ga", lambda _: LoraConfig(init_lora_weights="lora_ga"), ValueError,
        ("init_lora_weights", "'lora_ga'")),
    Bad("BitFitConfig-modules_to_save-str", lambda _: BitFitConfig(modules_to_save="lm_head"), TypeError,
        ("modules_to_save", "'lm_head'")),
    Bad("AdapterConfig-bottleneck_dim-0", lambda _: AdapterConfig(bottleneck_dim=0), ValueError,
        ("bottleneck_dim", "0")),
    Bad("AdapterConfig-variant-both", lambda _: AdapterConfig(variant="both"), ValueError,
        ("variant", "'houlsby'", "'both'")),
    Bad("AdapterConfig-non_linearity-swish", lambda _: AdapterConfig(non_linearity="swish"), ValueError,
        ("non_linearity", "'swish'")),
    Bad("AdapterConfig-scaling-nan", lambda _: AdapterConfig(scaling=float("nan")), ValueError, ("scaling", "nan")),
    Bad("AdapterConfig-scaling-str", lambda _: AdapterConfig(scaling="abc"), ValueError, ("scaling", "'abc'")),
    Bad("layerwise_param_groups-lr-negative", lambda m: fastpeft.layerwise_param_groups(m, lr=-1.0), ValueError,
        ("lr", "positive", "-1.0"), _toy),
    Bad("layerwise_param_groups-lr-str", lambda m: fastpeft.layerwise_param_groups(m, lr="a"), ValueError,
        ("lr", "'a'"), _toy),
    Bad("layerwise_param_groups-weight_decay-inf", lambda m: fastpeft.layerwise_param_groups(
        m, lr=1e-3, weight_decay=float("inf")), ValueError, ("weight_decay", "inf"), _toy),
    Bad("PromptTuningConfig-num_virtual_tokens-0", lambda _: PromptTuningConfig(num_virtual_tokens=0), ValueError,
        ("num_virtual_tokens", "0")),
    Bad("PromptTuningConfig-init_text-no-tokenizer", lambda _: PromptTuningConfig(init_text="great"), ValueError,
        ("init_text", "tokenizer", "None")),
    Bad("LayerwiseConfig-neither-field", lambda _: LayerwiseConfig(), ValueError,
        ("train_last_n=None", "layers_pattern=None")),
    Bad("LayerwiseConfig-train_last_n-0", lambda _: LayerwiseConfig(train_last_n=0), ValueError, ("train_last_n", "0")),
    Bad("LayerwiseConfig-layers_pattern-bad-regex", lambda _: LayerwiseConfig(layers_pattern="layers.("), ValueError,
        ("layers_pattern", "'layers.('")),
    # -- the model level: nothing changes when a call raises
    Bad("inject-model-a-str", lambda _: fastpeft.inject("model", LoraConfig(target_modules=["q_proj"])), TypeError,
        ("fastpeft.inject", "nn.Module", "str")),
    Bad("trainable_parameters-an-int", lambda _: fastpeft.trainable_parameters(5), TypeError,
        ("trainable_parameters", "nn.Module", "int")),
    Bad("FastLoRALinear-forward-x-a-list", lambda m: m([[1.0] * IN]), TypeError,
        ("input must be a torch.Tensor", f"(..., {IN})", "list"), _layer),
    Bad("select_by_gradients-a-layer-the-loss-misses", lambda m: fastpeft.select_by_gradients(
        m, [torch.randn(2, 16)], lambda mod, b: mod.layers[0].attn.q_proj(b).sum(), progress=False), ValueError,
        ("select_by_gradients", "layers.1.attn.q_proj", "no gradient", "nothing was selected"),
        lambda: fastpeft.inject(_toy(), SparseDeltaConfig(density=0.1, target_modules=["q_proj"]))),
    Bad("inject-target_modules-match-nothing", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["zzz"])),
        ValueError, ("target_modules", "['zzz']", "matched no"), _toy),
    Bad("inject-layers_to_transform-match-nothing", lambda m: fastpeft.inject(
        m, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7], layers_pattern="layers")), ValueError,
        ("matched no", "layers_to_transform=[7]", "'<layers>.<i>.'"), _toy),
    Bad("inject-orthogonal-odd-rank", lambda m: fastpeft.inject(m, LoraConfig(r=3, target_modules=["q_proj"],
                                                                              init_lora_weights="orthogonal")),
        ValueError, ("'orthogonal'", "even rank", "(r=3)"), _toy),
    Bad("inject-a-peft-model", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["q_proj"])), ValueError,
        ("holds Hugging Face PEFT modules", "fastpeft.accelerate"), lambda: __import__("peft").get_peft_model(
            _toy(), __import__("peft").LoraConfig(target_modules=["q_proj"]))),
    Bad("inject-a-peft-prompt-config", lambda m: fastpeft.inject(m, __import__("peft").PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4)), TypeError, ("PEFT's LoraConfig", "PromptTuningConfig",
                                                                 "get_peft_model"), _toy),
    Bad("inject-second-adapter-modules_to_save-on-a-lora-layer",
        lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["q_proj"]), "b"),
        ValueError, ("modules_to_save names", "another adapter's layers", "FastLoRALinear", "PEFT refuses"),
        lambda: fastpeft.inject(_toy(), LoraConfig(r=4, target_modules=["q_proj"]))),
    Bad("inject-second-adapter-with-bias-all",
        lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["v_proj"], bias="all"), "b"),
        ValueError, ("bias='all'", "adapter 'default' trains the base biases already", "bias='none'"),
        lambda: fastpeft.inject(_toy(), LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"))),
    Bad("inject-a-peft-config-target_parameters", lambda m: fastpeft.inject(m, __import__("peft").LoraConfig(
        target_modules=[], target_parameters=["layers.0.mlp.w"])), ValueError,
        ("target_parameters", "['layers.0.mlp.w']", "matched no parameter", "no 3-D expert weights"), _toy),
    Bad("inject-a-peft-config-kasa", lambda m: fastpeft.inject(m, __import__("peft").LoraConfig(
        target_modules=["q_proj"], use_dora=True, kasa_config=__import__("peft").KasaConfig())), ValueError,
        ("LoRA variants", "kasa_config"), _toy),
    Bad("inject-target-a-LayerNorm", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["norm"])), ValueError,
        ("target_modules", "'norm'", "LayerNorm"), _toy),
    Bad("inject-modules_to_save-match-nothing", lambda m: fastpeft.inject(
        m, LoraConfig(target_modules=["q_proj"], modules_to_save=["zzz"])), ValueError,
        ("modules_to_save", "['zzz']", "matched no"), _toy),
    Bad("inject-config-a-dict", lambda m: fastpeft.inject(m, {"r": 8}), TypeError, ("config", "dict"), _toy),
    Bad("inject-autocast_adapter_dtype-a-str", lambda m: fastpeft.inject(
        m, LoraConfig(target_modules=["q_proj"]), autocast_adapter_dtype="yes"), TypeError,
        ("autocast_adapter_dtype", "bool", "'yes'"), _toy),
    Bad("inject-adapter_name-dotted", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["q_proj"]), "a.b"),
        ValueError, ("adapter name", "'a.b'"), _toy),
    Bad("inject-adapter_name-training", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["q_proj"]),
                                                                 "training"),
        ValueError, ("adapter name", "'training'", "nn.ModuleDict"), _toy),
    Bad("inject-adapter_name-__base__", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["q_proj"]),
                                                                 "__base__"),
        ValueError, ("'__base__' is reserved", "base model"), _toy),
    Bad("set_adapter-a-list", lambda m: fastpeft.set_adapter(m, ["default", "b"]), TypeError,
        ("adapter_name must be one adapter's name", "['default', 'b']", "mixed_batch"), _lora_model),
    Bad("delete_adapter-a-list", lambda m: fastpeft.delete_adapter(m, ["default"]), TypeError,
        ("adapter_name must be one adapter's name", "['default']"), _lora_model),
    Bad("save_adapter-a-list", lambda m: fastpeft.save_adapter(m, "/tmp/fastpeft-never-written", ["default"]),
        TypeError, ("adapter_name must be one adapter's name", "['default']"), _lora_model),
    Bad("add_weighted_adapter-weight-nan", lambda m: fastpeft.add_weighted_adapter(m, ["default"], [float("nan")],
                                                                                  "m"),
        ValueError, ("weights", "nan"), _lora_model),
    Bad("add_weighted_adapter-combination-unknown", lambda m: fastpeft.add_weighted_adapter(m, ["default"], [1.0],
                                                                                           "m", "dare"),
        ValueError, ("combination_type", "'svd'", "'dare'"), _lora_model),
    Bad("add_weighted_adapter-ties-without-density", lambda m: fastpeft.add_weighted_adapter(
        m, ["default", "b"], [1.0, 0.5], "m", "ties"), ValueError, ("'ties' needs density", "got None"),
        lambda: _two_adapters()),
    Bad("add_weighted_adapter-density-negative", lambda m: fastpeft.add_weighted_adapter(
        m, ["default", "b"], [1.0, 0.5], "m", "dare_linear_svd", density=-0.5), ValueError,
        ("density must be >= 0", "-0.5"), lambda: _two_adapters()),
    Bad("add_weighted_adapter-majority-sign-method", lambda m: fastpeft.add_weighted_adapter(
        m, ["default", "b"], [1.0, 0.5], "m", "ties", density=0.5, majority_sign_method="mean"), ValueError,
        ("majority_sign_method", "'total'", "'mean'"), lambda: _two_adapters()),
    Bad("add_weighted_adapter-adapters-a-str", lambda m: fastpeft.add_weighted_adapter(m, "default", [1.0], "m"),
        TypeError, ("adapters", "list", "'default'"), _lora_model),
    Bad("disable_adapter-bitfit", lambda m: fastpeft.disable_adapter(m).__enter__(), ValueError,
        ("part of the model itself",), lambda: fastpeft.inject(_toy(), BitFitConfig())),
    Bad("forward-adapter_names-unknown", lambda m: m(torch.randn(2, 3, 16), adapter_names=["default", "zz"]),
        ValueError, ("adapter_names ['zz'] are not adapters",), _lora_model),
    Bad("inject-existing-adapter_name", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["k_proj"])),
        ValueError, ("'default'", "already exists"), _lora_model),
    Bad("inject-over-a-merged-adapter", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["k_proj"]), "b"),
        RuntimeError, ("merged", "unmerge"), _merged_model),
    Bad("inject-lora-beside-bitfit", lambda m: fastpeft.inject(m, LoraConfig(target_modules=["q_proj"]), "lora"),
        ValueError, ("['default']", "BitFitConfig", "only adapter"), _bitfit_model),
    Bad("inject-sparse_selection-scores", lambda m: fastpeft.inject(m, LoraConfig(
        target_modules=["q_proj"], sparse_density=0.1, sparse_selection="scores")), ValueError,
        ("sparse_selection='scores'", "select_by_gradients"), _toy),
    Bad("inject-SparseDeltaConfig-scores", lambda m: fastpeft.inject(m, SparseDeltaConfig(
        target_modules=["q_proj"], selection="scores")), ValueError, ("selection='scores'",), _toy),
    Bad("inject-AdapterConfig-match-nothing", lambda m: fastpeft.inject(m, AdapterConfig(
        bottleneck_dim=4, target_modules=["zzz"])), ValueError, ("target_modules", "['zzz']", "matched no"), _toy),
    Bad("inject-LayerwiseConfig-5-of-2-blocks", lambda m: fastpeft.inject(m, LayerwiseConfig(train_last_n=5)),
        ValueError, ("train_last_n=5", "2 blocks"), _toy),
    Bad("inject-PromptTuning-no-embeddings", lambda m: fastpeft.inject(m, PromptTuningConfig(num_virtual_tokens=2)),
        ValueError, ("get_input_embeddings", "Toy"), _toy),
    Bad("inject-PromptTuning-encoder-decoder", lambda m: fastpeft.inject(m, PromptTuningConfig(num_virtual_tokens=2)),
        ValueError, ("decoder-only and encoder-only", "T5ForConditionalGeneration", "is_encoder_decoder",
                     "SEQ_2_SEQ_LM"), lambda: _t5()),
    Bad("set_adapter-unknown", lambda m: fastpeft.set_adapter(m, "nope"), ValueError,
        ("adapter_name", "'nope'", "['default']"), _lora_model),
    Bad("delete_adapter-unknown", lambda m: fastpeft.delete_adapter(m, "nope"), ValueError,
        ("adapter_name", "'nope'", "['default']"), _lora_model),
    Bad("mixed_batch-unknown-name", lambda m: _mixed(m, ["default", "zzz"], _t(2, 5, IN)), ValueError,
        ("adapter_names", "['zzz']", "['default']"), _lora_model),
    Bad("mixed_batch-2-names-for-batch-3", lambda m: _mixed(m, ["default", None], _t(3, 5, IN)), ValueError,
        ("adapter_names", "2", "batch size 3"), _lora_model),
    Bad("mixed_batch-rows_per_sequence-0",
        lambda m: fastpeft.mixed_batch(m, ["default"], rows_per_sequence=0).__enter__(), ValueError,
        ("rows_per_sequence", "positive int", "0"), _lora_model),
    Bad("mixed_batch-a-str", lambda m: _mixed(m, "default", _t(2, 5, IN)), TypeError, ("adapter_names", "'default'"),
        _lora_model),
    Bad("mixed_batch-empty", lambda m: _mixed(m, [], _t(2, 5, IN)), TypeError, ("adapter_names", "[]"), _lora_model),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_raises_naming_the_argument(case):
    obj = case.make() if case.make is not None else None
    before = _snapshot(obj) if obj is not None else None
    with pytest.raises(BaseException) as excinfo:  # the command line's errors are SystemExit
        case.call(obj)
    _assert_message(excinfo, case.exc, case.words)
    if obj is not None:
        _assert_unchanged(obj, before)


def test_case_ids_are_unique():
    _assert_unique_ids(CASES, FILE_CASES, SAVE_CASES)


# ---- adapter files: loads that must fail, leaving the model as it was -------------------------------

KEY = "base_model.model.layers.0.attn.q_proj.lora_A.weight"  # (4, 16) in the saved LoRA adapter

SOURCES = {  # what the folder held before it was broken
    "lora": _lora_model,
    "sparse": lambda: fastpeft.inject(_toy(), SparseDeltaConfig(density=0.1, target_modules=["k_proj"])),
    "bitfit": _bitfit_model,
}
TARGETS = {  # the model the broken folder is loaded into
    "fresh": _toy,
    "lora": lambda: _lora_model(seed=9),
    "merged": _merged_model,
    "bitfit": _bitfit_model,
}


def _edit_config(d, **changes):
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _drop_config_key(d, key):
    cfg = json.loads((d / CONFIG_NAME).read_text())
    del cfg[key]
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    t = load_file(d / WEIGHTS_NAME)
    fn(t)
    save_file(t, d / WEIGHTS_NAME)


def _pickle_instead(d, name):
    t = load_file(d / WEIGHTS_NAME)
    (d / WEIGHTS_NAME).unlink()
    torch.save(t, d / name)


def _flip_sparse_indices(t):
    k = next(k for k in t if k.endswith(".sparse_delta.indices"))
    t[k] = t[k].flip(0)


@dataclass
class BadFile:
    id: str
    corrupt: Callable               # corrupt(folder) -> None, breaks the saved adapter in place
    exc: type
    words: tuple
    source: str = "lora"
    targets: tuple = ("fresh", "lora")
    kwargs: dict = field(default_factory=dict)  # load_adapter's other arguments
    folder: str = "adapter"        # what is passed to load_adapter, relative to the test's tmp_path


def _none(d):
    return None


FILE_CASES = [
    BadFile("missing-folder", _none, FileNotFoundError, (CONFIG_NAME, "nope"), folder="nope"),
    BadFile("missing-config", lambda d: (d / CONFIG_NAME).unlink(), FileNotFoundError, (CONFIG_NAME,)),
    BadFile("missing-weights", lambda d: (d / WEIGHTS_NAME).unlink(), FileNotFoundError, (WEIGHTS_NAME,)),
    BadFile("truncated-safetensors", lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:100]),
            ValueError, (WEIGHTS_NAME, "not a readable safetensors file")),
    BadFile("empty-safetensors", lambda d: (d / WEIGHTS_NAME).write_bytes(b""), ValueError,
            (WEIGHTS_NAME, "not a readable safetensors file")),
    BadFile("pickle-as-adapter_model.bin", lambda d: _pickle_instead(d, "adapter_model.bin"), ValueError,
            ("adapter_model.bin", "pickle", WEIGHTS_NAME)),
    BadFile("pickle-as-adapter_model.safetensors", lambda d: _pickle_instead(d, WEIGHTS_NAME), ValueError,
            (WEIGHTS_NAME, "not a readable safetensors file")),
    BadFile("tensor-wrong-shape", lambda d: _edit_weights(d, lambda t: t.update({KEY: torch.zeros(4, 15)})),
            ValueError, ("layers.0.attn.q_proj.lora_A.weight", "(4, 16)", "(4, 15)")),
    BadFile("tensor-int32", lambda d: _edit_weights(d, lambda t: t.update({KEY: torch.zeros(4, 16).int()})),
            ValueError, ("layers.0.attn.q_proj.lora_A.weight", "floating point", "torch.int32")),
    BadFile("missing-key", lambda d: _edit_weights(d, lambda t: t.pop(KEY)), ValueError,
            ("missing keys", "layers.0.attn.q_proj.lora_A.weight")),
    BadFile("unexpected-key", lambda d: _edit_weights(d, lambda t: t.update({"base_model.model.x.lora_A.weight":
                                                                             torch.zeros(1)})),
            ValueError, ("unexpected keys", "x.lora_A.weight")),
    BadFile("peft_type-PREFIX_TUNING", lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), ValueError,
            ("peft_type", "'LORA'", "'PREFIX_TUNING'")),
    BadFile("peft_type-missing", lambda d: _drop_config_key(d, "peft_type"), ValueError, ("peft_type", "got None")),
    BadFile("config-malformed-json", lambda d: (d / CONFIG_NAME).write_text('{"r": 8,'), ValueError,
            (CONFIG_NAME, "not valid JSON")),
    BadFile("config-not-utf8", lambda d: (d / CONFIG_NAME).write_bytes(b"\xff\xfe{"), ValueError,
            (CONFIG_NAME, "not valid JSON")),
    BadFile("config-a-json-list", lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), ValueError,
            (CONFIG_NAME, "JSON object", "list")),
    BadFile("config-r-str", lambda d: _edit_config(d, r="4"), ValueError, ("r must be a positive int", "'4'")),
    BadFile("config-lora_dropout-1.5", lambda d: _edit_config(d, lora_dropout=1.5), ValueError,
            ("lora_dropout", "1.5")),
    BadFile("config-use_dora", lambda d: _edit_config(d, use_dora=True), ValueError, ("use_dora",)),
    BadFile("config-targets-match-nothing", lambda d: _edit_config(d, target_modules=["c_attn"]), ValueError,
            ("target_modules", "['c_attn']", "matched no")),
    BadFile("config-rank_pattern-other-shapes", lambda d: _edit_config(d, rank_pattern={"q_proj": 2}), ValueError,
            ("layers.0.attn.q_proj.lora_A.weight", "(2, 16)", "(4, 16)")),
    BadFile("sparse-indices-unsorted", lambda d: _edit_weights(d, _flip_sparse_indices), ValueError,
            ("layers.0.attn.k_proj", "delta_indices", "sorted"), source="sparse", targets=("fresh",)),
    BadFile("bitfit-bias-wrong-shape", lambda d: _edit_weights(d, lambda t: t.update(
        {"base_model.model.layers.0.attn.k_proj.bias": torch.zeros(3)})), ValueError,
            ("layers.0.attn.k_proj.bias", "(16,)", "(3,)"), source="bitfit", targets=("fresh", "bitfit")),
    BadFile("load-trainable-str", _none, TypeError, ("trainable", "bool", "'yes'"), kwargs=dict(trainable="yes"),
            targets=("fresh",)),
    BadFile("load-bitfit-adapter_name-dotted", _none, ValueError, ("adapter name", "'a.b'"),
            source="bitfit", targets=("fresh",), kwargs=dict(adapter_name="a.b")),
    BadFile("load-adapter_name-training", _none, ValueError, ("adapter name", "'training'", "nn.ParameterDict"),
            kwargs=dict(adapter_name="training")),
    BadFile("load-adapter_name-forward", _none, ValueError, ("adapter name", "'forward'"),
            kwargs=dict(adapter_name="forward")),
    BadFile("load-over-a-merged-adapter", _none, RuntimeError, ("'default'", "merged", "unmerge"),
            targets=("merged",)),
    BadFile("load-lora-over-bitfit-adapter", _none, ValueError, ("'default'", "BitFitConfig", "LoraConfig"),
            targets=("bitfit",)),
    BadFile("load-lora-beside-bitfit-adapter", _none, ValueError, ("BitFitConfig", "only adapter"),
            targets=("bitfit",), kwargs=dict(adapter_name="lora")),
    BadFile("load-sparse-beside-lora-adapter", _none, ValueError, ("['default']", "SparseDeltaConfig", "only adapter"),
            source="sparse", targets=("lora",), kwargs=dict(adapter_name="sparse")),
    BadFile("load-autocast_adapter_dtype-an-int", _none, TypeError, ("autocast_adapter_dtype", "bool", "1"),
            targets=("fresh",), kwargs=dict(autocast_adapter_dtype=1)),
]


@pytest.mark.parametrize("case,into", [pytest.param(c, t, id=f"{c.id}-into-{t}") for c in FILE_CASES
                                       for t in c.targets])
def test_bad_adapter_folder_raises_and_leaves_model_unchanged(tmp_path, case, into):
    fastpeft.save_adapter(SOURCES[case.source](), tmp_path / "adapter")
    case.corrupt(tmp_path / "adapter")
    model = TARGETS[into]()
    before = _snapshot(model)
    with pytest.raises(Exception) as excinfo:
        fastpeft.load_adapter(model, tmp_path / case.folder, **case.kwargs)
    _assert_message(excinfo, case.exc, case.words)
    _assert_unchanged(model, before)


# ---- saves: atomic, so a failure midway leaves the folder as it was ------------------------------------

class _Boom(OSError):
    pass


def _fail_config_write(monkeypatch, d):
    """The weights file is written, then writing adapter_config.json fails."""
    def boom(*a, **k):
        raise _Boom("disk full while writing adapter_config.json")
    monkeypatch.setattr(json, "dump", boom)


def _fail_rename_of(name):
    """Both files are written; renaming the finished temporary over ``name`` fails (for the config: after the
    weights file was renamed into place, which must be put back)."""
    def sabotage(monkeypatch, d):
        real = os.replace

        def replace(src, dst):
            if os.path.basename(os.fspath(src)).startswith(f".{name}.tmp-") and os.fspath(dst).endswith(name):
                raise _Boom("rename failed")
            return real(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    return sabotage


def _fail_keeping_the_old_file(monkeypatch, d):
    """Keeping the previous weights file under a second name fails (no hard links, and the copy fails too)."""
    def boom(*a, **k):
        raise _Boom("copy failed")
    monkeypatch.setattr(os, "link", boom)
    monkeypatch.setattr("shutil.copy2", boom)


@dataclass
class BadSave:
    id: str
    sabotage: Callable    # sabotage(monkeypatch, target folder)
    exc: type
    words: tuple
    existing: bool        # whether an adapter folder (with a README) is there already
    kwargs: dict = field(default_factory=dict)
    target: str = "adapter"


SAVE_CASES = [
    BadSave("save-config-write-fails-new-folder", _fail_config_write, _Boom, ("adapter_config.json",), False),
    BadSave("save-config-write-fails-over-folder", _fail_config_write, _Boom, ("adapter_config.json",), True),
    BadSave("save-config-rename-fails-over-folder", _fail_rename_of("adapter_config.json"), _Boom, ("rename",), True),
    BadSave("save-config-rename-fails-new-folder", _fail_rename_of("adapter_config.json"), _Boom, ("rename",), False),
    BadSave("save-weights-rename-fails-over-folder", _fail_rename_of("adapter_model.safetensors"), _Boom, ("rename",),
            True),
    BadSave("save-keeping-the-old-file-fails", _fail_keeping_the_old_file, _Boom, ("copy",), True),
    BadSave("save-unknown-adapter_name", lambda mp, d: None, ValueError, ("adapter_name", "'other'", "['default']"),
            True, dict(adapter_name="other")),
    BadSave("save-onto-a-file", lambda mp, d: None, ValueError, ("exists and is not a folder",), True,
            target="adapter/README.md"),
]


def _tree(root) -> dict:
    """Relative path -> bytes (None for folders) of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SAVE_CASES])
def test_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch, case):
    d = tmp_path / "adapter"
    if case.existing:
        fastpeft.save_adapter(_lora_model(seed=1), d)
        (d / "README.md").write_text("model card")
    before = _tree(tmp_path)
    model = _lora_model(seed=2)
    state = _snapshot(model)
    case.sabotage(monkeypatch, d)
    with pytest.raises(Exception) as excinfo:
        fastpeft.save_adapter(model, tmp_path / case.target, **case.kwargs)
    monkeypatch.undo()
    _assert_message(excinfo, case.exc, case.words)
    assert _tree(tmp_path) == before  # no half-written folder, no temporary left behind
    _assert_unchanged(model, state)



# ---- PEFT models and Trainer support: fastpeft.accelerate / restore / to_peft / save_pretrained ---------

def _peft_model(**over):
    """The toy as a Hugging Face PEFT LoRA model (r=4 on q/v)."""
    peft = pytest.importorskip("peft")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **over)
    return peft.get_peft_model(_toy(), peft.LoraConfig(**kw))


def _peft_loha_model():
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(_toy(), peft.LoHaConfig(r=4, target_modules=["q_proj"]))


def _peft_partly_alora():
    """Plain LoRA on q/v, and an aLoRA adapter on o_proj: the o_proj layers would stay on PEFT's forward (before
    2026-12-01 a lora_bias adapter made this case; fastpeft computes those now)."""
    peft = pytest.importorskip("peft")
    m = _peft_model()
    m.add_adapter("alora", peft.LoraConfig(r=4, target_modules=["o_proj"], alora_invocation_tokens=[1, 2]))
    return m


def _merged_fastpeft_model():
    m = _lora_model()
    next(iter(fastpeft.lora_layers(m).values())).merge()
    return m


def _adapter_state(model, shape):
    """An adapter state dict (PEFT's keys, what Trainer's resume hands to load_state_dict) of one tensor."""
    return model.load_state_dict({KEY: torch.zeros(shape)}, False)


def _sft(model, **kw):
    pytest.importorskip("trl")
    from fastpeft.hf import check_sft_model

    return check_sft_model(model, **kw)


PEFT_CASES = [
    Bad("accelerate-not-a-module", lambda _: fastpeft.accelerate("model"), TypeError, ("PEFT LoRA model", "str")),
    Bad("accelerate-model-without-lora", lambda m: fastpeft.accelerate(m), TypeError,
        ("Toy has no PEFT LoRA layer",), _toy),
    Bad("accelerate-fastpeft-model", lambda m: fastpeft.accelerate(m), TypeError, ("fastpeft model",), _lora_model),
    Bad("accelerate-strict-str", lambda m: fastpeft.accelerate(m, strict="yes"), TypeError, ("strict", "'yes'"),
        _peft_model),
    Bad("accelerate-loha-model", lambda m: fastpeft.accelerate(m), ValueError, ("LoRA model", "LOHA"),
        _peft_loha_model),
    Bad("accelerate-strict-alora-only", lambda m: fastpeft.accelerate(m, strict=True), ValueError,
        ("strict=True", "nothing was changed", "LoRA variant (ALora)"),
        lambda: _peft_model(alora_invocation_tokens=[1, 2])),
    Bad("accelerate-strict-alora-layer", lambda m: fastpeft.accelerate(m, strict=True), ValueError,
        ("strict=True", "nothing was changed", "o_proj", "ALora"), _peft_partly_alora),
    Bad("restore-not-a-module", lambda _: fastpeft.restore(3), TypeError, ("fastpeft.restore", "int")),
    Bad("to_peft-no-fastpeft-adapter", lambda m: fastpeft.to_peft(m), TypeError, ("no fastpeft adapter",), _toy),
    Bad("to_peft-merged-layer", lambda m: fastpeft.to_peft(m), ValueError, ("merged", "unmerge"),
        _merged_fastpeft_model),
    Bad("save_pretrained-unknown-selected_adapters",
        lambda m: m.save_pretrained("/nonexistent/never", selected_adapters=["zzz"]), ValueError,
        ("selected_adapters", "['zzz']", "['default']"), _lora_model),
    Bad("save_pretrained-push_to_hub", lambda m: m.save_pretrained("/nonexistent/never", push_to_hub=True),
        NotImplementedError, ("push_to_hub",), _lora_model),
    Bad("load_state_dict-adapter-state-missing-keys", lambda m: _adapter_state(m, (4, 16)), ValueError,
        ("load_state_dict", "adapter 'default'", "the state dict", "missing keys", "lora_B.weight"), _lora_model),
    Bad("sft-fastpeft-model-with-peft_config", lambda m: _sft(m, peft_config=object()), ValueError,
        ("fastpeft adapters", "without peft_config"), _lora_model),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PEFT_CASES])
def test_peft_interop_bad_input_raises_naming_what_was_found(case):
    test_bad_input_raises_naming_the_argument(case)
    _assert_unique_ids(CASES, PEFT_CASES)


# ---- quantized base layers (QLoRA) ---------------------------------------------------------------------
# Other libraries' quantized layers are refused by name; bitsandbytes layers that cannot be read or merged
# say why, naming the module; the fused 4-bit kernel names the shape it cannot take.

def _foreign(cls_name: str, module_path: str) -> nn.Module:
    """An object shaped like another library's quantized linear layer (only its class name and module matter)."""
    cls = type(cls_name, (nn.Module,), {"__module__": module_path})
    m = cls()
    m.register_buffer("qweight", torch.zeros(4, 4, dtype=torch.int32))
    return m


def _torchao_linear() -> nn.Module:
    sub = type("AffineQuantizedTensor", (torch.Tensor,), {"__module__": "torchao.dtypes.affine_quantized_tensor"})
    lin = nn.Linear(IN, OUT)
    lin.weight = nn.Parameter(torch.randn(OUT, IN).as_subclass(sub), requires_grad=False)
    return lin


def _bnb4(in_f=128, out_f=48, quantized=True, **kw) -> nn.Module:
    from fastpeft.quant import import_bitsandbytes

    bnb = import_bitsandbytes()
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.float32, quant_type="nf4", **kw)
    return layer.to("cpu") if quantized else layer


def _qlora(layer, x=None, path=None, backend="triton"):
    from fastpeft.functional import qlora_linear
    from fastpeft.quant import QuantizedWeight

    qw = QuantizedWeight.from_module(layer, "proj")
    k, n = qw.in_features, qw.out_features
    x = torch.randn(3, k) if x is None else x
    return qlora_linear(x, qw, None, torch.randn(R, k), torch.randn(n, R), 1.0, backend=backend, path=path)


def _with_env(var, value, fn):
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


def _merge_without_a_quantizer(layer):
    """Merging into a 4-bit layer where bitsandbytes cannot quantize (no backend for the device, say)."""
    import warnings

    from fastpeft.quant import import_bitsandbytes, merge_into_quantized

    bnb = import_bitsandbytes()

    def no_backend(*a, **k):
        raise NotImplementedError("no bitsandbytes backend for this device")
    old = bnb.nn.Params4bit._quantize
    bnb.nn.Params4bit._quantize = no_backend
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merge_into_quantized(layer, torch.ones(48, 128), name="proj")
    finally:
        bnb.nn.Params4bit._quantize = old


def _base_kind(m):
    from fastpeft.quant import base_kind
    return base_kind(m, "model.layers.0.q_proj")


def _view(m):
    from fastpeft.quant import QuantizedWeight
    return QuantizedWeight.from_module(m, "proj")


QLORA_CASES = [
    Bad("qlora-gptq-layer", _base_kind, TypeError, ("'model.layers.0.q_proj'", "GPTQ", "bitsandbytes"),
        lambda: _foreign("QuantLinear", "auto_gptq.nn_modules.qlinear.qlinear_cuda")),
    Bad("qlora-awq-layer", _base_kind, TypeError, ("'model.layers.0.q_proj'", "AWQ"),
        lambda: _foreign("WQLinear_GEMM", "awq.modules.linear.gemm")),
    Bad("qlora-hqq-layer", _base_kind, TypeError, ("'model.layers.0.q_proj'", "HQQ"),
        lambda: _foreign("HQQLinear", "hqq.core.quantize")),
    Bad("qlora-torchao-weight", _base_kind, TypeError, ("'model.layers.0.q_proj'", "torchao"), _torchao_linear),
    Bad("qlora-linear4bit-not-quantized-yet", _view, ValueError, ("'proj'", "not quantized yet"),
        lambda: _bnb4(quantized=False)),
    Bad("qlora-fused-K-not-multiple-of-blocksize", lambda m: _qlora(m, path="fused"), ValueError,
        ("'proj'", "in_features=80", "block size 64"), lambda: _bnb4(80, 48)),
    Bad("qlora-env-fused-K-not-multiple-of-blocksize",
        lambda m: _with_env("FASTPEFT_QLORA_PATH", "fused", lambda: _qlora(m)), ValueError,
        ("FASTPEFT_QLORA_PATH=fused", "proj", "in_features=80", "block size 64"), lambda: _bnb4(80, 48)),
    Bad("qlora-x-last-dim-100", lambda m: _qlora(m, x=torch.randn(3, 100), backend="reference"), ValueError,
        ("x's last dim", "in_features=128", "got 100"), _bnb4),
    Bad("qlora-merge-requantize-impossible", _merge_without_a_quantizer, RuntimeError,
        ("'proj'", "cannot requantize", "unchanged", "dequantize=True"), _bnb4),
    Bad("qlora-cpu-inference-kernel-not-a-bool", lambda m: _cpu_kernel_switch("no"), TypeError,
        ("set_cpu_inference_kernel's enabled", "must be a bool", "'no'"), _bnb4),
    # -- dequantize_weight(out=): the caller's buffer (the workspace's) is checked before anything is written
    Bad("dequantize-out-too-small", lambda m: _dequantize_into(m, torch.empty(100)), ValueError,
        ("out must be", "torch.float32", "6144 elements", "(100,)"), _bnb4),
    Bad("dequantize-out-wrong-dtype", lambda m: _dequantize_into(m, torch.empty(6144, dtype=torch.float16)),
        ValueError, ("out must be", "torch.float32", "torch.float16"), _bnb4),
    Bad("dequantize-out-not-contiguous", lambda m: _dequantize_into(m, torch.empty(2, 6144).t()), ValueError,
        ("out must be", "contiguous", "(6144, 2)"), _bnb4),
]


def _two_adapters():
    """The toy with LoRA "default" and "b", both r=4 on q_proj / v_proj (add_weighted_adapter's pruning types)."""
    m = _lora_model()
    return fastpeft.inject(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="b",
                           activate=False)


def _cpu_kernel_switch(value):
    from fastpeft.quant import _CPU_KERNEL, set_cpu_inference_kernel

    before = _CPU_KERNEL[0]
    try:
        set_cpu_inference_kernel(value)
    finally:
        assert _CPU_KERNEL[0] is before  # refused before the switch moved


def _dequantize_into(m, out):
    from fastpeft.quant import dequantize_weight

    return dequantize_weight(_view(m), torch.float32, out=out)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in QLORA_CASES])
def test_quantized_base_bad_input_raises_naming_the_module(case):
    _skip_without_bitsandbytes()
    test_bad_input_raises_naming_the_argument(case)


def test_linear_subclasses_named_like_quantized_layers_or_with_a_forward_of_their_own():
    """An nn.Linear subclass that computes as nn.Linear (its forward) is LoRA's to wrap, whatever it is called
    (``FakeQuantLinear``); one with a forward of its own (fake quantization for QAT: ``torch.ao.nn.qat.Linear``) is
    refused by inject and from_linear, naming it: fastpeft's layer computes x W^T + b and would bypass that forward
    (the output moved by 0.37 on injection). A module of that name holding integer weights is a GPTQ layer."""
    from fastpeft.quant import base_kind

    plain = type("FakeQuantLinear", (nn.Linear,), {"__module__": "my_project.qat"})(IN, OUT)
    assert base_kind(plain, "proj") == "linear"
    layer = fastpeft.FastLoRALinear.from_linear(plain, r=2)
    assert layer(_t(3, IN)).shape == (3, OUT)

    def rounded(self, x):
        return nn.functional.linear(x, (self.weight * 8).round() / 8, self.bias)
    fake = type("FakeQuantLinear", (nn.Linear,), {"__module__": "my_project.qat", "forward": rounded})(IN, OUT)
    qat = torch.ao.nn.qat.Linear(IN, OUT, qconfig=torch.ao.quantization.get_default_qat_qconfig())
    for module in (fake, qat):
        with pytest.raises(TypeError, match=f"'proj' is a .*{type(module).__name__}, an nn.Linear with a forward"):
            base_kind(module, "proj")
        with pytest.raises(TypeError, match="a forward of its own"):
            fastpeft.FastLoRALinear.from_linear(module, r=2)
        model = nn.Sequential(module)
        with pytest.raises(TypeError, match="module '0' is a .*forward of its own"):
            fastpeft.inject(model, LoraConfig(r=2, target_modules=["0"]))
        assert model[0] is module
    with pytest.raises(TypeError, match="'proj' is a GPTQ quantized layer"):
        base_kind(_foreign("QuantLinear", "my_project.layers"), "proj")


def test_qlora_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES)


# ---- quantized models: inject / merge_and_unload refuse before any surgery -------------------------------

class _QuantToy(nn.Module):
    """Two bnb NF4 projections (q, v) and, with ``foreign``, a GPTQ-like layer as ``k``."""

    def __init__(self, foreign=False):
        super().__init__()
        self.q = _bnb4(128, 48)
        self.v = _bnb4(128, 48)
        if foreign:
            self.k = _foreign("QuantLinear", "auto_gptq.nn_modules.qlinear.qlinear_cuda")


def _quant_model(foreign=False):
    return _QuantToy(foreign)


def _lora_on_quant():
    return fastpeft.inject(_QuantToy(), LoraConfig(r=R, target_modules=["q", "v"], init_lora_weights=False))


def _unload_without_a_quantizer(model):
    """merge_and_unload requantizing where bitsandbytes cannot: v's requantization fails after q's succeeded."""
    import warnings

    from fastpeft.quant import import_bitsandbytes

    bnb = import_bitsandbytes()
    old, calls = bnb.nn.Params4bit._quantize, []

    def second_fails(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise NotImplementedError("no bitsandbytes backend for this device")
        return old(self, *a, **k)
    bnb.nn.Params4bit._quantize = second_fails
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fastpeft.merge_and_unload(model)
    finally:
        bnb.nn.Params4bit._quantize = old


QLORA_MODEL_CASES = [
    Bad("qlora-inject-gptq-layer", lambda m: fastpeft.inject(m, LoraConfig(r=R, target_modules=["q", "k", "v"])),
        TypeError, ("'k'", "GPTQ", "bitsandbytes"), lambda: _quant_model(foreign=True)),
    Bad("qlora-inject-all-linear-gptq-layer", lambda m: fastpeft.inject(m, LoraConfig(r=R, target_modules="all-linear")),
        TypeError, ("'k'", "GPTQ"), lambda: _quant_model(foreign=True)),
    Bad("qlora-inject-rosa-on-4bit", lambda m: fastpeft.inject(m, LoraConfig(r=R, target_modules=["q", "v"],
                                                                              sparse_density=0.01)),
        ValueError, ("'q'", "Linear4bit", "sparse delta", "sparse_density=0"), _quant_model),
    Bad("qlora-sparse-delta-config-on-4bit", lambda m: fastpeft.inject(m, SparseDeltaConfig(target_modules=["q"])),
        ValueError, ("'q'", "Linear4bit", "floating-point"), _quant_model),
    Bad("qlora-merge-and-unload-requantize-impossible", _unload_without_a_quantizer, RuntimeError,
        ("'v'", "cannot requantize", "unchanged", "dequantize=True"), _lora_on_quant),
    Bad("qlora-merge-and-unload-dequantize-not-bool", lambda m: fastpeft.merge_and_unload(m, dequantize="yes"),
        TypeError, ("dequantize", "'yes'"), _lora_on_quant),
    Bad("qlora-modules_to_save-a-4bit-layer", lambda m: fastpeft.inject(m, LoraConfig(r=R, target_modules=["q"],
                                                                                     modules_to_save=["v"])),
        ValueError, ("modules_to_save", "'v'", "not floating point", "quantized"), _quant_model),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in QLORA_MODEL_CASES])
def test_quantized_model_bad_input_leaves_the_model_unchanged(case):
    _skip_without_bitsandbytes()
    test_bad_input_raises_naming_the_argument(case)


def test_qlora_model_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES)


# ---- DoRA: dora_linear's arguments, use_dora's combinations ----------------------------------------------

def _dora(**over):
    args = dict(x=_t(3, IN), weight=_t(OUT, IN), bias=_t(OUT), lora_A=_t(R, IN), lora_B=_t(OUT, R),
                magnitude=_t(OUT).abs() + 0.5, scaling=2.0)
    return fastpeft.dora_linear(**{**args, **over})


def _dora_layer():
    torch.manual_seed(0)
    layer = FastLoRALinear(IN, OUT, r=R, lora_alpha=8, init_lora_weights=False, use_dora=True)
    layer.add_adapter("second", 2, 4, init_lora_weights=False)
    return layer


def _dora_model():
    torch.manual_seed(0)
    return fastpeft.inject(_toy(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                              init_lora_weights=False))


DORA_CASES = [
    Bad("dora_linear-magnitude-len-23", lambda _: _dora(magnitude=_t(23)), ValueError,
        ("magnitude", "(24,)", "(23,)")),
    Bad("dora_linear-magnitude-2d", lambda _: _dora(magnitude=_t(OUT, 1)), ValueError, ("magnitude", "1-D", "2-D")),
    Bad("dora_linear-magnitude-not-a-tensor", lambda _: _dora(magnitude=[1.0] * OUT), TypeError, ("magnitude", "list")),
    Bad("dora_linear-magnitude-int64", lambda _: _dora(magnitude=torch.ones(OUT, dtype=torch.int64)), ValueError,
        ("magnitude", "floating point", "torch.int64")),
    Bad("dora_linear-magnitude-on-meta", lambda _: _dora(magnitude=torch.ones(OUT, device="meta")), ValueError,
        ("magnitude", "device", "meta")),
    Bad("dora_linear-dropout_mode-typo", lambda _: _dora(dropout_mode="lora-only"), ValueError,
        ("dropout_mode", "'exact'", "'lora_only'", "'lora-only'")),
    Bad("dora_linear-weight_sq_norm-len-23", lambda _: _dora(weight_sq_norm=_t(23)), ValueError,
        ("weight_sq_norm", "(24,)", "(23,)")),
    Bad("dora_linear-dropout-1", lambda _: _dora(dropout_p=1.0), ValueError, ("dropout_p", "[0, 1)", "1.0")),
    Bad("dora_linear-seed-negative", lambda _: _dora(seed=-1, dropout_p=0.1), ValueError, ("seed", "-1")),
    Bad("dora_linear-training-str", lambda _: _dora(training="yes"), TypeError, ("training", "'yes'")),
    Bad("dora_linear-lora_B-rank-3-vs-A-rank-4", lambda _: _dora(lora_B=_t(OUT, 3)), ValueError,
        ("lora_B", "(24, 4)", "(24, 3)")),
    Bad("dora_linear-backend-typo", lambda _: _dora(backend="cuda"), ValueError, ("backend", "'cuda'")),
    Bad("dora-layer-use_dora-str", lambda _: FastLoRALinear(IN, OUT, use_dora="yes"), TypeError, ("use_dora", "'yes'")),
    Bad("dora-layer-with-rosa", lambda _: FastLoRALinear(IN, OUT, use_dora=True, sparse_density=0.1), ValueError,
        ("use_dora=True", "sparse_density=0.1", "RoSA")),
    Bad("dora-add_adapter-with-rosa", lambda m: m.add_adapter("x", 2, 2, use_dora=True, sparse_density=0.5),
        ValueError, ("use_dora=True", "sparse_density=0.5"), _layer),
    Bad("dora-layer-adapter_ids", lambda m: m(_t(3, IN), adapter_ids=torch.tensor([0, 1, -1])), ValueError,
        ("DoRA adapters", "['default']", "per row", "set_adapter"), _dora_layer),
    Bad("dora-config-with-rosa", lambda _: LoraConfig(use_dora=True, sparse_density=0.1), ValueError,
        ("use_dora=True", "sparse_density=0.1")),
    Bad("dora-config-use_dora-int", lambda _: LoraConfig(use_dora=1), TypeError, ("use_dora", "1")),
    Bad("dora-mixed_batch", lambda m: _mixed(m, ["default", None], _t(2, 5, IN)), ValueError,
        ("mixed_batch", "DoRA adapters", "['default']"), _dora_model),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DORA_CASES])
def test_dora_bad_input_raises_naming_the_argument(case):
    test_bad_input_raises_naming_the_argument(case)


def test_dora_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES, DORA_CASES)


# ---- lora_experts: LoRA on a mixture of experts' expert weights ----------------------------------------------
def _experts():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4)
    ex = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
    return ex


def _moe(ex, **over):
    args = dict(hidden_states=_t(5, 16), top_k_index=torch.tensor([[0, 1], [2, 3], [1, 0], [3, 3], [2, 1]]),
                top_k_weights=torch.rand(5, 2),
                adapters={"gate_up_proj": [(_t(4, 2, 16), _t(4, 16, 2), 2.0)], "down_proj": [(_t(4, 2, 8),
                                                                                             _t(4, 16, 2), 2.0)]})
    return fastpeft.lora_experts(ex, **{**args, **over})


EXPERTS_CASES = [
    Bad("lora_experts-a-Linear", lambda _: fastpeft.lora_experts(nn.Linear(16, 16), _t(5, 16),
                                                                 torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 2)),
        TypeError, ("experts", "Linear is not a transformers experts module", "use_experts_implementation")),
    Bad("lora_experts-hidden-3d", lambda m: _moe(m, hidden_states=_t(1, 5, 16)), ValueError,
        ("hidden_states", "2-D", "3-D"), _experts),
    Bad("lora_experts-hidden-15-wide", lambda m: _moe(m, hidden_states=_t(5, 15)), ValueError,
        ("hidden_states' last dim", "hidden size 16", "got 15"), _experts),
    Bad("lora_experts-hidden-int", lambda m: _moe(m, hidden_states=torch.ones(5, 16, dtype=torch.int64)), TypeError,
        ("hidden_states", "float", "int64"), _experts),
    Bad("lora_experts-grouped_mm-rank-3", lambda m: _moe(m, form="grouped_mm", adapters={"down_proj": [
        (_t(4, 3, 8), _t(4, 16, 3), 1.0)]}), ValueError, ("form='grouped_mm' cannot run here", "16 bytes",
                                                         "form='loop'"), _experts),
    Bad("lora_experts-adapter_ids-float", lambda m: _moe(m, adapter_ids=torch.zeros(5)), TypeError,
        ("adapter_ids", "integer", "float32"), _experts),
    Bad("lora_experts-adapter_ids-4-rows", lambda m: _moe(m, adapter_ids=torch.zeros(4, dtype=torch.long)),
        ValueError, ("adapter_ids", "one id per row of hidden_states (5)", "(4,)"), _experts),
    Bad("lora_experts-adapter_ids-1", lambda m: _moe(m, adapter_ids=torch.ones(5, dtype=torch.long)), ValueError,
        ("adapter_ids", "[-1, 1)", "[1, 1]"), _experts),
    Bad("lora_experts-adapter_ids-lists-2-and-1", lambda m: _moe(m, adapter_ids=torch.zeros(5, dtype=torch.long),
                                                               adapters={"gate_up_proj": [None, None],
                                                                         "down_proj": [None]}),
        ValueError, ("adapter_ids", "one entry (or None) per adapter", "[1, 2]"), _experts),
    Bad("lora_experts-terms-a-tuple-of-tensors", lambda m: _moe(m, adapters={"down_proj": _t(4, 2, 8)}), TypeError,
        ("adapters['down_proj']", "list", "Tensor"), _experts),
    Bad("lora_experts-index-float", lambda m: _moe(m, top_k_index=torch.zeros(5, 2)), TypeError,
        ("top_k_index", "integer", "float32"), _experts),
    Bad("lora_experts-index-rows-4", lambda m: _moe(m, top_k_index=torch.zeros(4, 2, dtype=torch.long)), ValueError,
        ("top_k_index", "one row per row of hidden_states (5)", "(4, 2)"), _experts),
    Bad("lora_experts-weights-shape", lambda m: _moe(m, top_k_weights=torch.rand(5, 3)), ValueError,
        ("top_k_weights", "(5, 2)", "(5, 3)"), _experts),
    Bad("lora_experts-expert-id-4", lambda m: _moe(m, top_k_index=torch.full((5, 2), 4)), ValueError,
        ("top_k_index", "[0, 4)"), _experts),
    Bad("lora_experts-expert-id-negative", lambda m: _moe(m, top_k_index=torch.full((5, 2), -1)), ValueError,
        ("top_k_index", "[0, 4)"), _experts),
    Bad("lora_experts-adapters-list", lambda m: _moe(m, adapters=[]), TypeError, ("adapters", "dict", "list"),
        _experts),
    Bad("lora_experts-adapters-unknown-weight", lambda m: _moe(m, adapters={"up_proj": []}), ValueError,
        ("adapters", "'up_proj'", "'gate_up_proj'", "'down_proj'"), _experts),
    Bad("lora_experts-lora_A-in-15", lambda m: _moe(m, adapters={"gate_up_proj": [(_t(4, 2, 15), _t(4, 16, 2), 1.0)]}),
        ValueError, ("lora_A", "(4, r, 16)", "(4, 2, 15)"), _experts),
    Bad("lora_experts-lora_B-rank-3", lambda m: _moe(m, adapters={"down_proj": [(_t(4, 2, 8), _t(4, 16, 3), 1.0)]}),
        ValueError, ("lora_B", "(4, 16, r)", "(4, 16, 3)"), _experts),
    Bad("lora_experts-term-pair", lambda m: _moe(m, adapters={"down_proj": [(_t(4, 2, 8), _t(4, 16, 2))]}), TypeError,
        ("adapters['down_proj'][0]", "(lora_A, lora_B, scaling)"), _experts),
    Bad("lora_experts-scaling-str", lambda m: _moe(m, adapters={"down_proj": [(_t(4, 2, 8), _t(4, 16, 2), "2")]}),
        TypeError, ("scaling", "'2'"), _experts),
    Bad("lora_experts-form-typo", lambda m: _moe(m, form="grouped"), ValueError, ("form", "'loop'", "'grouped'"),
        _experts),
    Bad("lora_experts-check_ids-int", lambda m: _moe(m, check_ids=0), TypeError, ("check_ids", "0"), _experts),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in EXPERTS_CASES])
def test_lora_experts_bad_input_raises_naming_the_argument(case):
    test_bad_input_raises_naming_the_argument(case)


def test_experts_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES, DORA_CASES, EXPERTS_CASES)


# ---- lora_conv / FastLoRAConv / inject on convolutions -------------------------------------------------------
def _conv(**over):
    """x (2, 3, 6, 6), weight (5, 3, 3, 3), lora_A (2, 3, 3, 3), lora_B (5, 2)."""
    args = dict(x=_t(2, 3, 6, 6), weight=_t(5, 3, 3, 3), bias=_t(5), lora_A=_t(2, 3, 3, 3), lora_B=_t(5, 2),
                scaling=2.0)
    return fastpeft.lora_conv(**{**args, **over})


def _conv_layer():
    torch.manual_seed(0)
    layer = fastpeft.FastLoRAConv(nn.Conv2d(3, 5, 3, padding=1), r=2, init_lora_weights=False)
    layer.add_adapter("second", 2, 4, init_lora_weights=False)
    return layer


def _conv_dora_layer():
    layer = _conv_layer()
    layer.add_adapter("d", 2, 2, use_dora=True)
    return layer


class _EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.emb(x))


def _emb_net():
    torch.manual_seed(0)
    return _EmbNet()


def _two_bias_adapters():
    net = _convnet()()
    fastpeft.inject(net, LoraConfig(r=2, target_modules=["fc", "conv"], lora_bias=True))
    fastpeft.inject(net, LoraConfig(r=2, target_modules=["fc", "conv"], lora_bias=True), adapter_name="b")
    return net


def _weight_normed(norm):
    import warnings

    net = _convnet()()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the older weight_norm's deprecation)
        net.conv = norm(net.conv)
    return net


class StdConv(nn.Conv2d):
    """A convolution standardising its kernel in ``_conv_forward`` (its ``forward`` is nn.Conv2d's)."""

    def _conv_forward(self, x, w, b):
        return super()._conv_forward(x, (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True), b)


def _std_convnet():
    net = _convnet()()
    net.conv = StdConv(4, 4, 3)
    return net


def _reflect_conv_layer():
    torch.manual_seed(0)
    return fastpeft.FastLoRAConv(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), r=2)


class _ConvNet(nn.Module):
    def __init__(self, **conv):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, **conv)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _convnet(**conv):
    torch.manual_seed(0)
    return lambda: _ConvNet(**conv)


CONV_CASES = [
    Bad("lora_conv-x-channels-4", lambda _: _conv(x=_t(2, 4, 6, 6)), ValueError, ("x", "(N, 3, *spatial)",
                                                                                    "(2, 4, 6, 6)")),
    Bad("lora_conv-x-1d-for-2d-kernel", lambda _: _conv(x=_t(3, 6)), ValueError, ("x", "2 spatial dims", "(3, 6)")),
    Bad("lora_conv-weight-2d", lambda _: _conv(weight=_t(5, 3)), ValueError, ("weight", "kernel", "(5, 3)")),
    Bad("lora_conv-lora_A-kernel-1", lambda _: _conv(lora_A=_t(2, 3, 1, 1)), ValueError,
        ("lora_A", "(2, 3, 3, 3)", "(2, 3, 1, 1)")),
    Bad("lora_conv-lora_B-4d", lambda _: _conv(lora_B=_t(5, 2, 1, 1)), ValueError, ("lora_B", "2-D", "4-D")),
    Bad("lora_conv-lora_B-rank-3", lambda _: _conv(lora_B=_t(5, 3)), ValueError, ("lora_B", "(5, 2)", "(5, 3)")),
    Bad("lora_conv-bias-4", lambda _: _conv(bias=_t(4)), ValueError, ("bias", "(5,)", "(4,)")),
    Bad("lora_conv-x-int", lambda _: _conv(x=torch.ones(2, 3, 6, 6, dtype=torch.int64)), ValueError,
        ("x", "float32", "int64")),
    Bad("lora_conv-weight-fp64", lambda _: _conv(weight=_t(5, 3, 3, 3, dtype=torch.float64)), ValueError,
        ("weight", "x's dtype", "float64")),
    Bad("lora_conv-stride-0", lambda _: _conv(stride=0), ValueError, ("stride", ">= 1", "0")),
    Bad("lora_conv-stride-3-tuple", lambda _: _conv(stride=(1, 1, 1)), ValueError, ("stride", "tuple of 2",
                                                                                    "(1, 1, 1)")),
    Bad("lora_conv-padding-negative", lambda _: _conv(padding=-1), ValueError, ("padding", ">= 0", "-1")),
    Bad("lora_conv-padding-full", lambda _: _conv(padding="full"), ValueError, ("padding", "'same'", "'full'")),
    Bad("lora_conv-padding-same-stride-2", lambda _: _conv(padding="same", stride=2), ValueError,
        ("padding='same'", "stride 1", "(2, 2)")),
    Bad("lora_conv-scaling-tensor", lambda _: _conv(scaling=torch.tensor(2.0)), TypeError, ("scaling", "tensor")),
    Bad("lora_conv-dropout-1", lambda _: _conv(dropout_p=1.0), ValueError, ("dropout_p", "1.0")),
    Bad("lora_conv-triton", lambda _: _conv(backend="triton"), RuntimeError, ("triton", "lora_conv")),
    # -- FastLoRAConv
    Bad("FastLoRAConv-groups-2", lambda _: fastpeft.FastLoRAConv(nn.Conv2d(4, 4, 3, groups=2)), ValueError,
        ("groups=2", "groups=1")),
    Bad("FastLoRAConv-dilation-2", lambda _: fastpeft.FastLoRAConv(nn.Conv2d(4, 4, 3, dilation=2)), ValueError,
        ("dilation=(2, 2)", "kernel_size=(3, 3)", "lora_A is not dilated")),
    Bad("FastLoRAConv-transposed", lambda _: fastpeft.FastLoRAConv(nn.ConvTranspose2d(4, 4, 3)), ValueError,
        ("ConvTranspose2d", "nn.Conv1d / Conv2d / Conv3d")),
    Bad("FastLoRAConv-a-Linear", lambda _: fastpeft.FastLoRAConv(nn.Linear(4, 4)), ValueError,
        ("Linear", "nn.Conv1d / Conv2d / Conv3d")),
    Bad("FastLoRAConv-from_linear", lambda _: fastpeft.FastLoRAConv.from_linear(nn.Linear(4, 4)), TypeError,
        ("from_conv", "FastLoRALinear.from_linear")),
    Bad("FastLoRAConv-x-channels-4", lambda m: m(_t(2, 4, 6, 6)), ValueError, ("x", "(N, 3, *spatial)",
                                                                                "(2, 4, 6, 6)"), _conv_layer),
    Bad("FastLoRAConv-dora-reflect", lambda m: m.add_adapter("d", 2, 2, use_dora=True), ValueError,
        ("use_dora=True", "padding_mode='reflect'", "'d'"), _reflect_conv_layer),
    Bad("FastLoRAConv-sparse", lambda m: m.add_adapter("s", 2, 2, sparse_density=0.1), ValueError,
        ("sparse_density=0.1", "convolution"), _conv_layer),
    Bad("FastLoRAConv-adapter_ids-3-for-2", lambda m: m(_t(2, 3, 6, 6), torch.tensor([0, 1, 0])), ValueError,
        ("adapter_ids",), _conv_layer),
    Bad("FastLoRAConv-adapter_ids-2", lambda m: m(_t(2, 3, 6, 6), torch.tensor([0, 2])), ValueError,
        ("adapter_ids", "2"), _conv_layer),
    Bad("FastLoRAConv-adapter_ids-unbatched", lambda m: m(_t(3, 6, 6), torch.tensor([0])), ValueError,
        ("adapter_ids", "unbatched"), _conv_layer),
    Bad("FastLoRAConv-dora-routed", lambda m: m(_t(2, 3, 6, 6), torch.tensor([0, 2])), ValueError,
        ("DoRA", "'d'", "routed per row"), _conv_dora_layer),
    Bad("FastLoRAConv-to_linear", lambda m: m.to_linear(), TypeError, ("to_linear", "Conv2d"), _conv_layer),
    # -- inject on convolutions
    Bad("inject-conv-groups-2", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["conv"])), ValueError,
        ("'conv'", "groups=2"), _convnet(groups=2)),
    Bad("inject-conv-dilated", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["conv"])), ValueError,
        ("'conv'", "dilation=(2, 2)"), _convnet(dilation=2)),
    Bad("inject-conv-dora-reflect", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["fc", "conv"],
                                                                             use_dora=True)),
        ValueError, ("'conv'", "use_dora=True", "padding_mode='reflect'"), _convnet(padding_mode="reflect")),
    Bad("dora_conv-magnitude-4", lambda _: fastpeft.dora_conv(_t(2, 3, 6, 6), _t(5, 3, 3, 3), None, _t(2, 3, 3, 3),
                                                             _t(5, 2), _t(4), 1.0), ValueError,
        ("magnitude", "5 elements", "(4,)")),
    Bad("inject-conv-rosa", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["conv"], sparse_density=0.1)),
        ValueError, ("'conv'", "sparse delta"), _convnet()),
    Bad("inject-conv-orthogonal", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["fc", "conv"],
                                                                           init_lora_weights="orthogonal")),
        ValueError, ("'conv'", "orthogonal"), _convnet()),
    Bad("FastLoRAConv-orthogonal", lambda m: m.add_adapter("o", 2, 2, init_lora_weights="orthogonal"), ValueError,
        ("'o'", "orthogonal", "convolution"), _conv_layer),
    Bad("inject-conv-weight-norm", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["fc", "conv"])),
        ValueError, ("'conv'", "weight is computed from other Parameters", "fastpeft.accelerate"),
        lambda: _weight_normed(torch.nn.utils.parametrizations.weight_norm)),
    Bad("inject-conv-old-weight-norm", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["fc", "conv"])),
        ValueError, ("'conv'", "weight is computed from other Parameters"),
        lambda: _weight_normed(torch.nn.utils.weight_norm)),
    Bad("inject-conv-own-conv-forward", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["conv"])),
        ValueError, ("'conv'", "StdConv", "_conv_forward"), _std_convnet),
    Bad("inject-conv-dora-dilated", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["conv"],
                                                                             use_dora=True)),
        ValueError, ("'conv'", "use_dora=True", "dilation=(2, 2)"), _convnet(dilation=2, padding="same")),
    # -- PEFT's lora_bias
    Bad("LoraConfig-lora_bias-1", lambda _: LoraConfig(lora_bias=1), TypeError, ("lora_bias", "1")),
    Bad("LoraConfig-lora_bias-gaussian", lambda _: LoraConfig(lora_bias=True, init_lora_weights="gaussian"),
        ValueError, ("lora_bias=True", "init_lora_weights=True or False", "'gaussian'")),
    Bad("LoraConfig-lora_bias-dora", lambda _: LoraConfig(lora_bias=True, use_dora=True), ValueError,
        ("lora_bias=True", "use_dora=True")),
    Bad("LoraConfig-lora_bias-rosa", lambda _: LoraConfig(lora_bias=True, sparse_density=0.1), ValueError,
        ("lora_bias=True", "sparse_density=0.1")),
    Bad("FastLoRALinear-lora_bias-1", lambda _: FastLoRALinear(4, 4, lora_bias=1), TypeError, ("lora_bias", "1")),
    Bad("FastLoRAConv-lora_bias-yes", lambda _: fastpeft.FastLoRAConv(nn.Conv2d(2, 2, 1), lora_bias="yes"), TypeError,
        ("lora_bias", "'yes'")),
    Bad("FastLoRALinear-lora_bias-dora", lambda _: FastLoRALinear(4, 4, lora_bias=True, use_dora=True), ValueError,
        ("lora_bias=True", "use_dora=True")),
    Bad("inject-lora_bias-embedding", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["fc", "emb"],
                                                                               lora_bias=True)),
        ValueError, ("'emb'", "lora_bias=True"), _emb_net),
    Bad("add_weighted_adapter-lora_bias", lambda m: fastpeft.add_weighted_adapter(m, ["default", "b"], [0.5, 0.5],
                                                                                   "w", "cat"),
        ValueError, ("lora_bias", "['default', 'b']"), _two_bias_adapters),
    Bad("inject-conv-sparse-delta", lambda m: fastpeft.inject(m, SparseDeltaConfig(target_modules=["conv"])),
        ValueError, ("'conv'", "sparse delta"), _convnet()),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONV_CASES])
def test_lora_conv_bad_input_raises_naming_the_argument(case):
    test_bad_input_raises_naming_the_argument(case)


def test_conv_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES, DORA_CASES, EXPERTS_CASES, CONV_CASES)


# ---- inject with target_parameters: LoRA on a mixture of experts' expert weights (FastLoRAParameter) ----------------
_EXPERT_WEIGHTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _moe_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_experts=4,
                                      num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, vocab_size=31)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _moe_lora():
    return fastpeft.inject(_moe_model(), LoraConfig(r=2, target_parameters=_EXPERT_WEIGHTS))


def _moe_two_adapters():
    m = _moe_lora()
    return fastpeft.inject(m, LoraConfig(r=2, target_parameters=_EXPERT_WEIGHTS), "b")


def _expert_layer():
    return _moe_lora().model.layers[0].mlp.experts


def _moe_with_own_param():
    """A Qwen3-MoE whose attention module holds a Parameter of its own beside its q_proj / k_proj submodules."""
    m = _moe_model()
    m.model.layers[0].self_attn.register_parameter("w", nn.Parameter(torch.randn(4, 4)))
    return m


def _router_layer():
    model = fastpeft.inject(_moe_model(), LoraConfig(r=2, target_parameters=["mlp.gate.weight"]))
    return model.model.layers[0].mlp.gate


def _expert_call(layer, **over):
    args = dict(hidden_states=_t(6, 16), top_k_index=torch.tensor([[0, 1], [2, 3], [1, 0], [3, 3], [2, 1], [0, 2]]),
                top_k_weights=torch.rand(6, 2))
    return layer(**{**args, **over})


EXPERT_INJECT_CASES = [
    Bad("LoraConfig-target_parameters-str", lambda _: LoraConfig(target_parameters="mlp.experts.down_proj"),
        TypeError, ("target_parameters", "list of parameter names", "'mlp.experts.down_proj'")),
    Bad("LoraConfig-target_parameters-dropout", lambda _: LoraConfig(target_parameters=_EXPERT_WEIGHTS,
                                                                      lora_dropout=0.1),
        ValueError, ("target_parameters", "lora_dropout != 0", "ParamWrapper")),
    Bad("LoraConfig-target_parameters-dora", lambda _: LoraConfig(target_parameters=_EXPERT_WEIGHTS, use_dora=True),
        ValueError, ("target_parameters", "use_dora=True")),
    Bad("LoraConfig-target_parameters-lora_bias", lambda _: LoraConfig(target_parameters=_EXPERT_WEIGHTS,
                                                                        lora_bias=True),
        ValueError, ("target_parameters", "lora_bias=True")),
    Bad("LoraConfig-target_parameters-orthogonal", lambda _: LoraConfig(target_parameters=_EXPERT_WEIGHTS,
                                                                         init_lora_weights="orthogonal"),
        ValueError, ("target_parameters", "orthogonal")),
    Bad("inject-target_parameters-a-norm-weight", lambda m: fastpeft.inject(m, LoraConfig(
        target_parameters=["q_norm.weight"])), ValueError, ("q_norm.weight", "1-D", "2-D (out, in) and 3-D"),
        _moe_model),
    Bad("inject-target_parameters-and-target_modules-on-q_proj", lambda m: fastpeft.inject(m, LoraConfig(
        target_modules=["q_proj"], target_parameters=["q_proj.weight"])), ValueError,
        ("q_proj.weight", "target_modules adapts too"), _moe_model),
    Bad("inject-target_parameters-no-match", lambda m: fastpeft.inject(m, LoraConfig(target_parameters=["w9"])),
        ValueError, ("target_parameters", "['w9']", "matched no parameter", "mlp.experts.gate_up_proj"), _moe_model),
    Bad("inject-target_parameters-a-module-and-its-submodule", lambda m: fastpeft.inject(m, LoraConfig(
        target_parameters=["self_attn.w", "self_attn.q_proj.weight"])), ValueError,
        ("'model.layers.0.self_attn'", "submodule 'model.layers.0.self_attn.q_proj'"), _moe_with_own_param),
    Bad("inject-target_parameters-on-a-LoRA-layer", lambda m: fastpeft.inject(m, LoraConfig(
        target_parameters=["q_proj.weight"]), "c"), ValueError, ("q_proj.weight", "['default']",
                                                                 "through target_modules"),
        lambda: fastpeft.inject(_moe_model(), LoraConfig(r=2, target_modules=["q_proj"]))),
    Bad("inject-target_parameters-other-weights-than-held", lambda m: fastpeft.inject(m, LoraConfig(
        target_parameters=["down_proj"]), "c"), ValueError, ("'default'", "experts.gate_up_proj",
                                                             "same Parameters"), _moe_lora),
    Bad("inject-target_modules-an-expert-layer", lambda m: fastpeft.inject(m, LoraConfig(
        target_modules=["mlp.experts"]), "c"), ValueError, ("'model.layers.0.mlp.experts'", "target_parameters"),
        _moe_lora),
    Bad("inject-target_parameters-in-modules_to_save", lambda m: fastpeft.inject(m, LoraConfig(
        target_parameters=_EXPERT_WEIGHTS, modules_to_save=["mlp"])), ValueError,
        ("modules_to_save", "'model.layers.0.mlp'"), _moe_model),
    Bad("add_weighted_adapter-expert-weights", lambda m: fastpeft.add_weighted_adapter(m, ["default", "b"], [0.5, 0.5],
                                                                                        "w", "cat"),
        ValueError, ("target_parameters", "['default', 'b']"), _moe_two_adapters),
    Bad("FastLoRAParameter-a-bias", lambda _: fastpeft.FastLoRAParameter(nn.Linear(4, 4), "bias"), ValueError,
        ("parameter_name 'bias'", "Linear.bias", "1-D")),
    Bad("FastLoRAParameter-parameter_name-up_proj", lambda m: fastpeft.FastLoRAParameter(m.base_module(), "up_proj"),
        ValueError, ("parameter_name 'up_proj'", "no Parameter 'up_proj'"), _expert_layer),
    Bad("FastLoRAParameter-parameter_name-int", lambda _: fastpeft.FastLoRAParameter(nn.Linear(4, 4), 0), TypeError,
        ("parameter_name", "0")),
    Bad("FastLoRAParameter-twice-on-down_proj", lambda m: fastpeft.FastLoRAParameter(m, "down_proj"), ValueError,
        ("'down_proj'", "holds LoRA on it already"), _expert_layer),
    Bad("FastLoRAParameter-dropout", lambda m: m.add_adapter("d", 2, 2, lora_dropout=0.1), ValueError,
        ("'d'", "lora_dropout != 0"), _expert_layer),
    Bad("FastLoRAParameter-to_linear", lambda m: m.to_linear(), TypeError, ("merge_and_unload", "down_proj"),
        _expert_layer),
    Bad("FastLoRAParameter-router-adapter_ids-1", lambda m: m(_t(6, 16), adapter_ids=torch.ones(6, dtype=torch.long)),
        ValueError, ("adapter_ids", "[-1, 0]", "1..1"), _router_layer),
    Bad("FastLoRAParameter-router-adapter_ids-4-for-6-rows", lambda m: m(_t(6, 16), adapter_ids=torch.zeros(
        4, dtype=torch.long)), ValueError, ("4 adapter_ids", "6 rows", "(6, 16)"), _router_layer),
    Bad("forward-adapter_names-3-for-2-sequences", lambda m: m.eval()(torch.zeros(2, 3, dtype=torch.long),
                                                                       adapter_names=["default", "b", "__base__"]),
        ValueError, ("adapter_names has 3 names", "2 sequences"), _moe_two_adapters),
    Bad("forward-adapter_names-2-for-4-embedded", lambda m: m.eval()(input_ids=None, inputs_embeds=_t(4, 3, 16),
                                                                     adapter_names=["default", "b"]),
        ValueError, ("adapter_names has 2 names", "4 sequences"), _moe_two_adapters),
    Bad("generate-adapter_names-2-for-4-inputs", lambda m: m.eval().generate(
        inputs=torch.zeros(4, 3, dtype=torch.long), adapter_names=["default", "b"], max_new_tokens=1),
        ValueError, ("adapter_names has 2 names", "4 sequences"), _moe_two_adapters),
    Bad("FastLoRAParameter-adapter_ids-4-for-6-tokens", lambda m: _expert_call(m, adapter_ids=torch.zeros(
        4, dtype=torch.long)), ValueError, ("adapter_ids", "4 entries", "6 tokens"), _expert_layer),
    Bad("FastLoRAParameter-adapter_ids-1", lambda m: _expert_call(m, adapter_ids=torch.ones(6, dtype=torch.long)),
        ValueError, ("adapter_ids", "[-1, 0]", "1..1"), _expert_layer),
    Bad("FastLoRAParameter-adapter_ids-float", lambda m: _expert_call(m, adapter_ids=torch.zeros(6)), TypeError,
        ("adapter_ids", "integer", "float32"), _expert_layer),
    Bad("FastLoRAParameter-hidden-15", lambda m: _expert_call(m, hidden_states=_t(6, 15)), ValueError,
        ("hidden_states' last dim", "16", "15"), _expert_layer),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in EXPERT_INJECT_CASES])
def test_expert_inject_bad_input_raises_naming_the_argument(case):
    test_bad_input_raises_naming_the_argument(case)


def test_expert_inject_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES, DORA_CASES, EXPERTS_CASES, CONV_CASES,
                       EXPERT_INJECT_CASES)


# ---- PiSSA / OLoRA (base-rewriting inits), PEFT's conversion to plain LoRA, unload -----------------------------------

def _merged_layer():
    layer = FastLoRALinear(IN, OUT, r=2, init_lora_weights=False)
    layer.merge()
    return layer


def _two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3), nn.Conv2d(3, 4, 3))


def _tied_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight
    return model


def _gpt2_block():
    import transformers
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8))


def _converted_with(model, initial: Optional[Callable] = None, adapter_name="default"):
    """save_adapter(model, <tmp>/out, path_initial_model_for_weight_conversion=<tmp>/init), <tmp>/init written by
    ``initial(folder)`` (None: no such folder)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        if initial is not None:
            initial(os.path.join(tmp, "init"))
        fastpeft.save_adapter(model, os.path.join(tmp, "out"), adapter_name,
                              path_initial_model_for_weight_conversion=os.path.join(tmp, "init"))


def _loaded_with_residual(model):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        fastpeft.save_adapter(_lora_model(), tmp)
        fastpeft.load_adapter(model, tmp, residual=True)


PISSA_CASES = [
    Bad("LoraConfig-init-pissa_niter-no-number", lambda _: LoraConfig(init_lora_weights="pissa_niter_"), ValueError,
        ("init_lora_weights", "'pissa_niter_'", "'pissa_niter_<n>'")),
    Bad("LoraConfig-init-PISSA-upper", lambda _: LoraConfig(init_lora_weights="PISSA"), ValueError,
        ("init_lora_weights", "'PISSA'")),
    Bad("FastLoRALinear-pissa-r-above-min-dim", lambda _: FastLoRALinear(8, 3, r=4, init_lora_weights="pissa"),
        ValueError, ("'default'", "init_lora_weights='pissa'", "r=4", "(3, 8)", "only 3 singular directions")),
    Bad("FastLoRALinear-olora-fp64", lambda _: FastLoRALinear(8, 8, r=2, init_lora_weights="olora",
                                                              dtype=torch.float64),
        ValueError, ("init_lora_weights='olora'", "fp32 / fp16 / bf16", "float64")),
    Bad("FastLoRALinear-pissa-with-sparse-delta", lambda _: FastLoRALinear(8, 8, r=2, init_lora_weights="pissa",
                                                                           sparse_density=0.1),
        ValueError, ("init_lora_weights='pissa'", "sparse delta", "0.1")),
    Bad("reset_lora_parameters-pissa-on-an-adapter", lambda m: m.reset_lora_parameters("pissa"), ValueError,
        ("init_lora_weights='pissa'", "'default'", "subtract a second time"), lambda: FastLoRALinear(IN, OUT, r=2)),
    Bad("add_adapter-pissa-on-a-merged-layer", lambda m: m.add_adapter("b", 2, 2, init_lora_weights="pissa"),
        ValueError, ("'b'", "merged adapter", "unmerge() first"), _merged_layer),
    Bad("inject-olora-on-a-convolution", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["0", "2"],
                                                                                  init_lora_weights="olora")),
        ValueError, ("matched '2'", "convolution", "Unknown initialization"), _two_linears),
    Bad("inject-pissa-r-above-a-layer's-min-dim", lambda m: fastpeft.inject(m, LoraConfig(
        r=4, target_modules=["0", "1"], init_lora_weights="pissa")), ValueError,
        ("matched '1'", "r=4", "(3, 6)", "only 3 singular directions"), _two_linears),
    Bad("inject-pissa-on-a-tied-head", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["1"],
                                                                                init_lora_weights="pissa")),
        ValueError, ("matched '1'", "tied to ['0.weight']", "would not start as its base"), _tied_head),
    Bad("inject-olora-on-a-Conv1D", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["c_attn"],
                                                                             init_lora_weights="olora")),
        ValueError, ("'h.0.attn.c_attn'", "Conv1D", "first forward", "'pissa' works there"), _gpt2_block),
    Bad("inject-pissa-on-target_parameters", lambda _: LoraConfig(target_parameters=["0.weight"],
                                                                  init_lora_weights="pissa_niter_4"),
        ValueError, ("target_parameters", "init_lora_weights='pissa_niter_4'", "2-D weight")),
    Bad("save_adapter-conversion-no-initial-folder", lambda m: _converted_with(m), FileNotFoundError,
        ("adapter_model.safetensors",), _lora_model),
    Bad("save_adapter-conversion-initial-of-another-rank", lambda m: _converted_with(m, lambda d: fastpeft.save_adapter(
        fastpeft.inject(_toy(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), d)), ValueError,
        ("path_initial_model_for_weight_conversion", "initial adapter has r=2", "'default' r=4",
         "saved right after it was made"), _lora_model),
    Bad("save_adapter-conversion-initial-of-another-alpha", lambda m: _converted_with(
        m, lambda d: fastpeft.save_adapter(fastpeft.inject(_toy(), LoraConfig(
            r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])), d)), ValueError,
        ("path_initial_model_for_weight_conversion", "initial adapter has lora_alpha=32", "'default' lora_alpha=8"),
        _lora_model),
    Bad("save_adapter-conversion-initial-with-an-extra-layer", lambda m: _converted_with(
        m, lambda d: fastpeft.save_adapter(fastpeft.inject(_toy(), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "k_proj"])), d)), ValueError,
        ("path_initial_model_for_weight_conversion", "k_proj.lora_A.weight", "which adapter 'default' does not"),
        _lora_model),
    Bad("save_adapter-conversion-initial-missing-a-layer", lambda m: _converted_with(m, lambda d: fastpeft.save_adapter(
        fastpeft.inject(_toy(), LoraConfig(r=4, target_modules=["q_proj"])), d)), ValueError,
        ("path_initial_model_for_weight_conversion", "v_proj.lora_A.weight is missing"),
        _lora_model),
    Bad("save_adapter-conversion-bitfit", lambda m: _converted_with(m, lambda d: None), ValueError,
        ("path_initial_model_for_weight_conversion", "BITFIT", "only LoRA adapters convert"),
        lambda: fastpeft.inject(_toy(), BitFitConfig())),
    Bad("load_adapter-residual-str", lambda m: fastpeft.load_adapter(m, "/nonexistent", residual="yes"), TypeError,
        ("residual", "bool", "str"), _toy),
    Bad("load_adapter-residual-for-a-plain-LoRA-file", lambda m: _loaded_with_residual(m), ValueError,
        ("residual=True", "init_lora_weights=True", "only PiSSA / OLoRA / LoftQ / CorDA adapters"), _toy),
    Bad("unload-a-bottleneck-adapter", lambda m: fastpeft.unload(m), ValueError,
        ("unload", "AdapterConfig", "delete_adapter"),
        lambda: fastpeft.inject(_toy(), AdapterConfig(bottleneck_dim=4, target_modules=["q_proj"]))),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PISSA_CASES])
def test_pissa_bad_input_raises_naming_the_argument(case):
    test_bad_input_raises_naming_the_argument(case)


def test_pissa_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES, DORA_CASES, EXPERTS_CASES, CONV_CASES,
                       EXPERT_INJECT_CASES, PISSA_CASES)


# ---- LoftQ: inject's init_lora_weights="loftq" and replace_lora_weights_loftq ---------------------------

_LOFTQ = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})


def _embedding_and_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))


def _loftq_checkpoint(model, tensors: dict):
    """replace_lora_weights_loftq(model, <tmp>/model.safetensors holding ``tensors``)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        fastpeft.replace_lora_weights_loftq(model, tmp, progress=False)


LOFTQ_CASES = [
    Bad("reset_lora_parameters-loftq-on-an-adapter", lambda m: m.reset_lora_parameters("loftq"), ValueError,
        ("init_lora_weights='loftq'", "'default'", "quantize Q again"), lambda: FastLoRALinear(IN, OUT, r=2)),
    Bad("LoraConfig-loftq-without-loftq_config", lambda _: LoraConfig(init_lora_weights="loftq"), ValueError,
        ("init_lora_weights='loftq'", "needs loftq_config", "LoftQConfig")),
    Bad("LoraConfig-loftq-bits-2", lambda _: LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2}),
        ValueError, ("loftq_config['loftq_bits']", "4 (NF4) or 8 (int8)", "got 2")),
    Bad("LoraConfig-loftq-iter-0", lambda _: LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0}),
        ValueError, ("loftq_config['loftq_iter']", ">= 1", "got 0")),
    Bad("LoraConfig-loftq-unknown-key", lambda _: LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4}),
        ValueError, ("loftq_config", "unknown keys ['bits']", "loftq_bits")),
    Bad("LoraConfig-loftq_config-a-list", lambda _: LoraConfig(init_lora_weights="loftq", loftq_config=[4]),
        TypeError, ("loftq_config", "dict or a peft.LoftQConfig", "list")),
    Bad("FastLoRALinear-loftq-bits-3", lambda _: FastLoRALinear(8, 8, r=2, init_lora_weights="loftq",
                                                                loftq_config={"loftq_bits": 3}),
        ValueError, ("loftq_bits", "got 3")),
    Bad("inject-loftq-on-a-Conv1D", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["c_attn"], **_LOFTQ)),
        ValueError, ("'h.0.attn.c_attn'", "init_lora_weights='loftq'", "Conv1D", "wrong shapes"), _gpt2_block),
    Bad("inject-loftq-on-an-embedding", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["0"], **_LOFTQ)),
        ValueError, ("matched '0'", "an embedding", "linear layers"), _embedding_and_linear),
    Bad("inject-loftq-on-a-convolution", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["0", "2"],
                                                                                  **_LOFTQ)),
        ValueError, ("matched '2'", "a convolution", "linear layers"), _two_linears),
    Bad("inject-loftq-r-above-a-layer's-min-dim", lambda m: fastpeft.inject(m, LoraConfig(
        r=4, target_modules=["0", "1"], **_LOFTQ)), ValueError,
        ("matched '1'", "r=4", "(3, 6)", "only 3 singular directions"), _two_linears),
    Bad("inject-loftq-on-a-4bit-base", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["q", "v"],
                                                                                **_LOFTQ)),
        ValueError, ("'q'", "Linear4bit", "quantizes a floating-point W", "replace_lora_weights_loftq"),
        lambda: _quant_model()),
    Bad("save_adapter-conversion-of-a-loftq-adapter", lambda m: _converted_with(m, lambda d: None), ValueError,
        ("path_initial_model_for_weight_conversion", "LoftQ", "does not convert"),
        lambda: fastpeft.inject(_toy(), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], **_LOFTQ))),
    Bad("replace_lora_weights_loftq-no-quantized-layer", lambda m: fastpeft.replace_lora_weights_loftq(m, "/x"),
        ValueError, ("no LoRA layer of adapter 'default'", "bitsandbytes base", "inject LoRA first"), _lora_model),
    Bad("replace_lora_weights_loftq-callback-an-int",
        lambda m: fastpeft.replace_lora_weights_loftq(m, "/x", callback=3), TypeError, ("callback", "callable", "int"), lambda: _lora_on_quant()),
    Bad("replace_lora_weights_loftq-adapter-name-absent", lambda m: fastpeft.replace_lora_weights_loftq(
        m, "/x", adapter_name="other"), ValueError, ("adapter 'other'", "adapters: ['default']"),
        lambda: _lora_on_quant()),
    Bad("replace_lora_weights_loftq-no-such-path", lambda m: fastpeft.replace_lora_weights_loftq(m, "/nonexistent"),
        FileNotFoundError, ("model_path", "/nonexistent", ".safetensors"), lambda: _lora_on_quant()),
    Bad("replace_lora_weights_loftq-model-names-no-checkpoint", lambda m: fastpeft.replace_lora_weights_loftq(m),
        ValueError, ("names no checkpoint", "model_path"), lambda: _lora_on_quant()),
    Bad("replace_lora_weights_loftq-checkpoint-lacks-a-layer", lambda m: _loftq_checkpoint(
        m, {"q.weight": torch.randn(48, 128)}), ValueError, ("no weight of layer 'v'", "looked for v.weight"),
        lambda: _lora_on_quant()),
    Bad("replace_lora_weights_loftq-a-quantized-checkpoint", lambda m: _loftq_checkpoint(
        m, {"q.weight": torch.ones(48, 128, dtype=torch.int8), "v.weight": torch.ones(48, 128, dtype=torch.int8)}),
        ValueError, ("checkpoint's q.weight is I8", "not a floating-point weight", "unquantized"),
        lambda: _lora_on_quant()),
    Bad("replace_lora_weights_loftq-model_path-an-int", lambda m: fastpeft.replace_lora_weights_loftq(m, 3),
        TypeError, ("model_path", "str or os.PathLike", "int"), lambda: _lora_on_quant()),
    Bad("replace_lora_weights_loftq-checkpoint-of-another-shape", lambda m: _loftq_checkpoint(
        m, {"q.weight": torch.randn(48, 100), "v.weight": torch.randn(48, 128)}), ValueError,
        ("checkpoint's q.weight is (48, 100)", "layer 'q'", "(48, 128)"), lambda: _lora_on_quant()),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LOFTQ_CASES])
def test_loftq_bad_input_raises_naming_the_argument(case):
    _skip_without_bitsandbytes()
    test_bad_input_raises_naming_the_argument(case)


def test_loftq_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES, DORA_CASES, EXPERTS_CASES, CONV_CASES,
                       EXPERT_INJECT_CASES, PISSA_CASES, LOFTQ_CASES)


# ---- EVA: inject's init_lora_weights="eva", initialize_lora_eva_weights / get_eva_state_dict ----------------------

_EVA = dict(init_lora_weights="eva", eva_config={"rho": 2.0})


def _eva_model():
    return fastpeft.inject(_toy(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **_EVA))


def _eva_batches(n=2):
    return [{"input_ids": torch.randint(0, 10, (2, 5))} for _ in range(n)]


EVA_CASES = [
    Bad("LoraConfig-eva-rho-0.5", lambda _: LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5}), ValueError,
        ("eva_config['rho']", ">= 1.0", "0.5")),
    Bad("LoraConfig-eva-tau-2", lambda _: LoraConfig(init_lora_weights="eva", eva_config={"tau": 2}), ValueError,
        ("eva_config['tau']", "[0, 1]", "2")),
    Bad("LoraConfig-eva-unknown-key", lambda _: LoraConfig(init_lora_weights="eva", eva_config={"r": 2}), ValueError,
        ("eva_config", "unknown keys ['r']", "rho")),
    Bad("LoraConfig-eva_config-a-list", lambda _: LoraConfig(init_lora_weights="eva", eva_config=[2.0]), TypeError,
        ("eva_config", "dict or a peft.EvaConfig", "list")),
    Bad("LoraConfig-eva-whiten-str", lambda _: LoraConfig(init_lora_weights="eva", eva_config={"whiten": "yes"}),
        TypeError, ("eva_config['whiten']", "'yes'")),
    Bad("LoraConfig-eva-target_parameters", lambda _: LoraConfig(target_parameters=["0.weight"], **_EVA), ValueError,
        ("target_parameters", "init_lora_weights='eva'")),
    Bad("inject-eva-on-a-convolution", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["1", "2"], **_EVA)),
        ValueError, ("matched ['2']", "init_lora_weights='eva'", "linear layers", "Unknown initialization"),
        _two_linears),
    Bad("FastLoRAConv-eva", lambda _: fastpeft.FastLoRAConv(nn.Conv2d(3, 4, 3), r=2, init_lora_weights="eva"),
        ValueError, ("'default'", "init_lora_weights='eva'", "FastLoRAConv", "Unknown initialization")),
    Bad("initialize_lora_eva_weights-not-an-eva-adapter", lambda m: fastpeft.initialize_lora_eva_weights(
        m, _eva_batches()), ValueError, ("adapter 'default'", "init_lora_weights=True", "init_lora_weights='eva'"),
        _lora_model),
    Bad("initialize_lora_eva_weights-no-data", lambda m: fastpeft.initialize_lora_eva_weights(m), ValueError,
        ("dataloader", "eva_state_dict"), _eva_model),
    Bad("initialize_lora_eva_weights-adapter-absent", lambda m: fastpeft.initialize_lora_eva_weights(
        m, _eva_batches(), adapter_name="other"), ValueError, ("no LoRA adapter 'other'", "['default']"), _eva_model),
    Bad("initialize_lora_eva_weights-beside-another-adapter", lambda m: fastpeft.initialize_lora_eva_weights(
        m, _eva_batches()), ValueError, ("other adapters too", "['b']", "before adding others"),
        lambda: fastpeft.inject(_eva_model(), LoraConfig(r=2, target_modules=["q_proj"]), "b")),
    Bad("initialize_lora_eva_weights-state-dict-of-another-layer", lambda m: fastpeft.initialize_lora_eva_weights(
        m, eva_state_dict={"layers.0.attn.k_proj": torch.zeros(2, 16)}), ValueError,
        ("eva_state_dict holds ['layers.0.attn.k_proj']", "linear layers of adapter 'default'"), _eva_model),
    Bad("initialize_lora_eva_weights-state-dict-wrong-width", lambda m: fastpeft.initialize_lora_eva_weights(
        m, eva_state_dict={"layers.0.attn.q_proj": torch.zeros(2, 15)}), ValueError,
        ("eva_state_dict['layers.0.attn.q_proj']", "(k, 16)", "(2, 15)"), _eva_model),
    Bad("initialize_lora_eva_weights-state-dict-a-list", lambda m: fastpeft.initialize_lora_eva_weights(
        m, eva_state_dict=[1]), TypeError, ("eva_state_dict", "dict", "list"), _eva_model),
    Bad("get_eva_state_dict-a-generator", lambda m: fastpeft.get_eva_state_dict(m, iter(_eva_batches())), TypeError,
        ("dataloader", "sized iterable", "list_iterator"), _eva_model),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in EVA_CASES])
def test_eva_bad_input_raises_naming_the_argument(case):
    pytest.importorskip("peft")
    test_bad_input_raises_naming_the_argument(case)


def test_eva_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES, DORA_CASES, EXPERTS_CASES, CONV_CASES,
                       EXPERT_INJECT_CASES, PISSA_CASES, LOFTQ_CASES, EVA_CASES)


# ---- CorDA: preprocess_corda, then inject's init_lora_weights="corda" ---------------------------------------

_CORDA = dict(init_lora_weights="corda", corda_config={"corda_method": "ipm"})


def _corda_ready(r=2):
    """A toy whose q_proj / v_proj hold CorDA eigens of rank ``r`` (preprocess_corda over two batches)."""
    model = _toy()
    fastpeft.preprocess_corda(model, LoraConfig(r=r, target_modules=["q_proj", "v_proj"], **_CORDA),
                              run_model=lambda: [model(torch.randn(3, 16)) for _ in range(2)])
    return model


CORDA_CASES = [
    Bad("LoraConfig-corda-method-xpm", lambda _: LoraConfig(init_lora_weights="corda",
                                                            corda_config={"corda_method": "xpm"}), ValueError,
        ("corda_config['corda_method']", "('ipm', 'kpm')", "'xpm'")),
    Bad("LoraConfig-corda-unknown-key", lambda _: LoraConfig(init_lora_weights="corda", corda_config={"rank": 2}),
        ValueError, ("corda_config", "unknown keys ['rank']", "corda_method")),
    Bad("LoraConfig-corda-with-dora", lambda _: LoraConfig(use_dora=True, **_CORDA), ValueError,
        ("init_lora_weights='corda'", "use_dora=True")),
    Bad("FastLoRALinear-corda", lambda _: FastLoRALinear(8, 8, r=2, init_lora_weights="corda"), ValueError,
        ("'default'", "init_lora_weights='corda'", "preprocess_corda", "fastpeft.inject")),
    Bad("inject-corda-without-preprocess", lambda m: fastpeft.inject(m, LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], **_CORDA)), ValueError,
        ("matched 'layers.0.attn.q_proj'", "CorDA eigens", "preprocess_corda", "residual=True"), _toy),
    Bad("inject-corda-another-rank-than-preprocessed", lambda m: fastpeft.inject(m, LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], **_CORDA)), ValueError,
        ("eigens.U_WC is (16, 2)", "expected (16, 4)", "r=4"), _corda_ready),
    Bad("inject-corda-on-a-Conv1D", lambda m: fastpeft.inject(m, LoraConfig(r=2, target_modules=["c_attn"], **_CORDA)),
        ValueError, ("'h.0.attn.c_attn'", "init_lora_weights='corda'", "Conv1D", "not offered"), _gpt2_block),
    Bad("preprocess_corda-a-plain-config",
        lambda m: fastpeft.preprocess_corda(m, LoraConfig(target_modules=["q_proj"])), ValueError, ("preprocess_corda", "init_lora_weights='corda'", "init_lora_weights=True"), _toy),
    Bad("preprocess_corda-run_model-an-int", lambda m: fastpeft.preprocess_corda(m, LoraConfig(
        target_modules=["q_proj"], **_CORDA), run_model=3), TypeError, ("run_model", "callable", "int"), _toy),
    Bad("preprocess_corda-a-layernorm-target", lambda m: fastpeft.preprocess_corda(m, LoraConfig(
        target_modules=["norm"], **_CORDA)), ValueError, ("target_modules matched 'norm'", "nn.Linear modules only"),
        _toy),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CORDA_CASES])
def test_corda_bad_input_raises_naming_the_argument(case):
    pytest.importorskip("peft")
    pytest.importorskip("attr")
    test_bad_input_raises_naming_the_argument(case)


def test_corda_case_ids_are_unique():
    _assert_unique_ids(CASES, QLORA_CASES, QLORA_MODEL_CASES, DORA_CASES, EXPERTS_CASES, CONV_CASES,
                       EXPERT_INJECT_CASES, PISSA_CASES, LOFTQ_CASES, EVA_CASES, CORDA_CASES)
