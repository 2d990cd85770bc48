"""Adapter files in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's, relative to ``base_model.model.``:
- ``<module>.lora_A.weight`` (r, in) and ``<module>.lora_B.weight`` (out, r) for each LoRA layer;
- ``<module>.base_layer.bias`` for a LoRA layer's bias and ``<path>.bias`` for other biases, when the
  config's ``bias`` trains them;
- ``<module>.<param>`` for every parameter of a ``modules_to_save`` module (its trained copy).

Saves are atomic (a temporary folder renamed into place); loads read and check the config, every key
and every shape before the model is touched, and never unpickle anything.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

import torch
import torch.nn as nn

from ._checks import check_adapter_name, check_sparse_delta
from .layers import FastLoRALinear
from .methods import CONFIG_BY_TYPE, METHOD_CONFIGS, PromptTuningConfig, inject_method, plan_method
from .inject import (LoraConfig, ModulesToSaveWrapper, SparseDeltaConfig, active_adapter, adapter_configs, inject,
                     is_bias, lora_layers, plan_lora, saved_module_wrappers, sparse_layers)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT LoraConfig fields that change what the adapter computes and that fastpeft does not implement:
# an adapter that sets any of them cannot give PEFT's outputs here, so loading it is refused.
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "layers_to_transform", "lora_bias", "layer_replication",
                "target_parameters", "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
                "use_bdlora", "megatron_config")
_CONFIG_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
                  "use_rslora", "init_lora_weights", "modules_to_save", "rank_pattern", "alpha_pattern")
_SPARSE_LORA_FIELDS = ("sparse_density", "sparse_block_size", "sparse_selection")  # RoSA: fastpeft's own keys
_SPARSE_FIELDS = ("density", "block_size", "selection", "target_modules", "exclude_modules")
SPARSE_PEFT_TYPE = "SPARSE_DELTA"  # fastpeft's own type: a sparse delta alone (PEFT has no equivalent)
# A sparse delta's tensors: <module>.sparse_delta.indices (int64) and <module>.sparse_delta.values.
_SPARSE_SUFFIXES = (".sparse_delta.indices", ".sparse_delta.values")


def _adapter_keys(model: nn.Module, adapter_name: str, config: LoraConfig, layers: dict, saved: list) -> dict:
    """File key -> the model's parameter that it holds, for adapter ``adapter_name``.

    layers: the LoRA layers holding the adapter; saved: the names of every modules_to_save wrapper."""
    keys = {}
    for name, layer in layers.items():
        a, b = layer.adapter_parameters(adapter_name)
        keys[f"{name}.lora_A.weight"] = a
        keys[f"{name}.lora_B.weight"] = b
    for name in saved:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            if adapter_name not in module.modules_to_save:
                continue
            module = module.modules_to_save[adapter_name]
        for pname, p in module.named_parameters():
            keys[f"{name}.{pname}"] = p
    if config.bias == "lora_only":
        for name, layer in layers.items():
            if layer.bias is not None:
                keys[f"{name}.base_layer.bias"] = layer.bias
    elif config.bias == "all":
        for pname, p in _bias_parameters(model, saved):
            mod, _, leaf = pname.rpartition(".")
            keys[f"{mod}.base_layer.{leaf}" if mod in layers else pname] = p
    return keys


def _bias_parameters(model: nn.Module, saved: list) -> list:
    """``(name, parameter)`` of the biases ``bias="all"`` trains, outside modules_to_save modules."""
    return [(n, p) for n, p in model.named_parameters() if is_bias(n) and not any(n.startswith(s + ".") for s in saved)]


def _saved_modules(model: nn.Module) -> list:
    return list(saved_module_wrappers(model))


def _take_sparse(model: nn.Module, config, plan, weights: dict, directory) -> dict:
    """Pop and check the sparse-delta tensors of the file: target name -> (indices, values).

    Every target must have them when the config has a sparse delta, and no other key may carry them."""
    if isinstance(config, SparseDeltaConfig):
        block = config.block_size
    elif config.sparse_density > 0.0:
        block = config.sparse_block_size
    else:
        block = None
    found = {}
    for key in [k for k in weights if k.endswith(_SPARSE_SUFFIXES)]:
        name = key[: key.rindex(".sparse_delta.")]
        if block is None or name not in plan.targets:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit the model: unexpected keys [{key!r}]")
        found.setdefault(name, {})[key[len(name):]] = weights.pop(key)
    if block is None:
        return {}
    out = {}
    for name in plan.targets:
        parts = found.get(name, {})
        missing = [name + s for s in _SPARSE_SUFFIXES if s not in parts]
        if missing:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit the model: missing keys {missing}")
        idx, vals = parts[_SPARSE_SUFFIXES[0]], parts[_SPARSE_SUFFIXES[1]]
        module = model.get_submodule(name)
        if not vals.is_floating_point():
            raise ValueError(f"adapter tensor {name + _SPARSE_SUFFIXES[1]!r} must be floating point, got {vals.dtype}")
        try:
            check_sparse_delta(idx, vals, module.out_features, module.in_features, block)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sparse delta of {name!r} in {os.fspath(directory)!r}: {e}") from None
        out[name] = (idx, vals)
    return out


def _load_sparse_adapter(model, config, adapter_name, plan, sparse, weights, directory, trainable):
    """load_adapter for a SparseDeltaConfig file: checks done by the caller except the leftover keys."""
    if weights:
        raise ValueError(f"adapter {os.fspath(directory)!r} does not fit the model: unexpected keys {sorted(weights)[:6]}")
    configs = adapter_configs(model)
    if adapter_name in configs:
        layers = sparse_layers(model)
        if set(layers) != set(plan.targets) or not isinstance(configs[adapter_name], SparseDeltaConfig):
            raise ValueError(f"adapter config in {os.fspath(directory)!r} targets {sorted(plan.targets)}, but "
                             f"adapter {adapter_name!r} of the model is on {sorted(layers)}")
        merged = [n for n, layer in layers.items() if layer.merged]
        if merged:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into layers {merged[:4]}: unmerge them before "
                               "loading over it")
        if any(layers[n].block_size != config.block_size for n in layers):
            raise ValueError(f"adapter config in {os.fspath(directory)!r} has block_size {config.block_size}, the "
                             f"model's adapter {adapter_name!r} another")
        model._fastpeft_adapters = {adapter_name: config}
    else:
        inject(model, config, adapter_name, plan=plan)
    for name, layer in sparse_layers(model).items():
        layer.set_delta(*sparse[name])
        layer.delta_values.requires_grad_(trainable)
    return model


def _expected_shapes(model: nn.Module, config: LoraConfig, plan) -> dict:
    """File key -> shape, for the adapter ``plan`` would create on ``model`` (before it exists)."""
    expected = {}
    for name, (r, _) in plan.targets.items():
        lin = model.get_submodule(name)
        expected[f"{name}.lora_A.weight"] = (r, lin.in_features)
        expected[f"{name}.lora_B.weight"] = (lin.out_features, r)
        if config.bias == "lora_only" and lin.bias is not None:
            expected[f"{name}.base_layer.bias"] = tuple(lin.bias.shape)
    for name in plan.saved:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        for pname, p in module.named_parameters():
            expected[f"{name}.{pname}"] = tuple(p.shape)
    if config.bias == "all":
        for pname, p in _bias_parameters(model, plan.saved + _saved_modules(model)):
            mod, _, leaf = pname.rpartition(".")
            expected[f"{mod}.base_layer.{leaf}" if mod in plan.targets else pname] = tuple(p.shape)
    return expected


PROMPT_KEY = "prompt_embeddings"  # PEFT's key for the virtual tokens (no base_model.model. prefix)


def _method_key(param_name: str) -> str:
    return PROMPT_KEY if param_name == "fastpeft_prompt.prompt_embeddings" else param_name


def _method_config_json(model: nn.Module, config) -> dict:
    d = {k: v for k, v in config.to_dict().items()}
    d.update(peft_type=config.peft_type, task_type=None, inference_mode=True)
    if isinstance(config, PromptTuningConfig):  # PEFT's prompt-tuning fields
        d.update(token_dim=model.fastpeft_prompt.prompt_embeddings.shape[1], num_transformer_submodules=1,
                 prompt_tuning_init="TEXT" if config.init_text else "RANDOM",
                 prompt_tuning_init_text=config.init_text,
                 base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None)
        d.pop("init_text")
    return d


def _load_method(model: nn.Module, config, adapter_name: str, weights: dict, directory, trainable: bool):
    """load_adapter for BitFit / adapters / prompt tuning / layer-wise: check the file against the plan,
    then inject (a fresh model) or overwrite (the same adapter), then copy."""
    configs = adapter_configs(model)
    if configs and (adapter_name not in configs or type(configs[adapter_name]) is not type(config)):
        raise ValueError(f"model already has adapter(s) {list(configs)}; a {type(config).__name__} adapter loads "
                         f"onto a model without adapters, or over its own ({adapter_name!r})")
    if configs:
        params = dict(model.named_parameters())
        expected = {_method_key(n): tuple(params[n].shape) for n in model._fastpeft_trained}
    else:
        expected = {_method_key(n): shape for n, shape in plan_method(model, config).items()}
    weights = {(k[len(PREFIX):] if k == PREFIX + PROMPT_KEY else k): v for k, v in weights.items()}
    _check_against(expected, weights, directory)
    if not configs:
        model._fastpeft_trained = inject_method(model, config)
        model._fastpeft_adapters = {adapter_name: config}
        model._fastpeft_active = adapter_name
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in model._fastpeft_trained:
            params[n].copy_(weights[_method_key(n)])
            params[n].requires_grad_(trainable)
    return model


def _sparse_keys(layers: dict, adapter_name: str) -> dict:
    """File key -> tensor for each layer's sparse delta (SparseDeltaLinear, or a RoSA adapter's)."""
    keys = {}
    for name, layer in layers.items():
        delta = (layer.adapter_sparse_delta(adapter_name) if isinstance(layer, FastLoRALinear)
                 else (layer.delta_indices, layer.delta_values))
        if delta is not None:
            keys[name + _SPARSE_SUFFIXES[0]] = delta[0].to(torch.int64)
            keys[name + _SPARSE_SUFFIXES[1]] = delta[1]
    return keys


def _config_json(model: nn.Module, config: LoraConfig, layers: dict) -> dict:
    d = {k: getattr(config, k) for k in _CONFIG_FIELDS}
    if config.sparse_density > 0.0:
        d.update({k: getattr(config, k) for k in _SPARSE_LORA_FIELDS})
    # The resolved full names, which PEFT matches exactly: "all-linear", regexes and exclusions are
    # already applied, so PEFT adapts exactly the layers that were trained here.
    d["target_modules"] = sorted(layers)
    d["exclude_modules"] = None
    d.update(peft_type="LORA", task_type=None, inference_mode=True, use_dora=False, fan_in_fan_out=False,
             layers_to_transform=None, layers_pattern=None, revision=None,
             base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None)
    return d


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (how FSDP2's ``fully_shard`` holds a parameter: one shard per rank)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False  # no process group, no DTensor: skip the import
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor

    return isinstance(t, DTensor)


def save_adapter(model: nn.Module, directory, adapter_name: str = "default", is_main_process: bool | None = None
                 ) -> None:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's format, atomically.

    The files are written to a temporary folder beside ``directory`` and renamed into place; other files
    already in ``directory`` are kept. A failure leaves ``directory`` as it was.

    Distributed: under DDP call it on rank 0 with the DDP wrapper or its ``.module``. Under FSDP2
    (``fully_shard``) the adapter's parameters are sharded DTensors: every rank must call it, since
    gathering them is a collective, and only global rank 0 writes. ``is_main_process`` (PEFT's argument)
    overrides which callers write.
    """
    from safetensors.torch import save_file

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of this model; it has {list(configs)}")
    config = configs[adapter_name]
    if isinstance(config, METHOD_CONFIGS):
        params = dict(model.named_parameters())
        keys = {_method_key(n): params[n] for n in model._fastpeft_trained}
        config_json = _method_config_json(model, config)
        layers = {}
    elif isinstance(config, SparseDeltaConfig):
        layers = sparse_layers(model)
        keys = {}
        config_json = {k: getattr(config, k) for k in _SPARSE_FIELDS}
        config_json.update(peft_type=SPARSE_PEFT_TYPE, target_modules=sorted(layers), exclude_modules=None)
    else:
        layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapter_names}
        keys = _adapter_keys(model, adapter_name, config, layers, _saved_modules(model))
        config_json = _config_json(model, config, layers)
    keys.update(_sparse_keys(layers, adapter_name))
    sharded = any(_sharded(p) for p in keys.values())
    # full_tensor() all-gathers an FSDP2 shard; every rank runs the gathers, in the same (key) order.
    tensors = {(k if k == PROMPT_KEY else PREFIX + k):
               (p.detach().full_tensor() if _sharded(p) else p.detach()).to("cpu").contiguous().clone()
               for k, p in keys.items()}
    if is_main_process is None:
        is_main_process = not sharded or torch.distributed.get_rank() == 0
    if not is_main_process:
        return

    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory {directory!r} exists and is not a folder")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, WEIGHTS_NAME), "rb+") as f:
            os.fsync(f.fileno())
        if os.path.isdir(directory):
            for entry in os.listdir(directory):  # keep what else the folder holds (a README, a tokenizer)
                if entry not in (CONFIG_NAME, WEIGHTS_NAME):
                    src = os.path.join(directory, entry)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, entry))
            old = os.path.join(parent, f".{os.path.basename(directory)}.old-{uuid.uuid4().hex}")
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(old, directory)  # put the previous adapter back: a failed save changes nothing
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter_config(directory):
    """The ``LoraConfig`` (or fastpeft's ``SparseDeltaConfig``) in ``directory/adapter_config.json``; raises
    for other PEFT types and for LoRA variants fastpeft cannot compute (DoRA, layer replication, ...)."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in adapter directory {os.fspath(directory)!r}")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
    if d.get("peft_type") in CONFIG_BY_TYPE:
        cls = CONFIG_BY_TYPE[d["peft_type"]]
        fields = {k for k in cls.__dataclass_fields__ if k not in ("tokenizer", "init_text")}
        try:
            return cls(**{k: d[k] for k in fields if k in d and d[k] is not None})
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid adapter config {path}: {e}") from None
    if d.get("peft_type") == SPARSE_PEFT_TYPE:
        try:
            return SparseDeltaConfig(**{k: d[k] for k in _SPARSE_FIELDS if k in d and d[k] is not None})
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid adapter config {path}: {e}") from None
    if d.get("peft_type") != "LORA":
        raise ValueError(f"peft_type in {path} must be one of {['LORA', SPARSE_PEFT_TYPE, *CONFIG_BY_TYPE]}, got "
                         f"{d.get('peft_type')!r}")
    bad = {k: d[k] for k in _UNSUPPORTED if d.get(k) not in (None, False, [], {}, 0)}
    if bad:
        raise ValueError(f"adapter config {path} uses LoRA variants fastpeft does not compute: {bad}")
    init = d.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        # PiSSA, OLoRA, LoftQ, ... change the base weights at init: the adapter alone does not carry them.
        raise ValueError(f"init_lora_weights={init!r} in {path}: adapters initialised this way modify the "
                         "base weights and cannot be loaded onto the original model")
    kwargs = {k: d[k] for k in _CONFIG_FIELDS + _SPARSE_LORA_FIELDS if k in d and d[k] is not None}
    kwargs.pop("init_lora_weights", None)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid adapter config {path}: {e}") from None


def read_adapter_weights(directory) -> dict:
    """Key (without ``base_model.model.``) -> tensor from ``directory/adapter_model.safetensors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(directory, n))]
        if pickled:
            raise ValueError(f"{os.path.join(directory, pickled[0])} is a pickle file; fastpeft loads "
                             f"{WEIGHTS_NAME} only (pickles can run code): convert it with safetensors")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in adapter directory {directory!r}")
    try:
        raw = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    out = {}
    for k, v in raw.items():
        out[k[len(PREFIX):] if k.startswith(PREFIX) else k] = v
    return out


def _resolve_aliases(expected: dict, weights: dict) -> dict:
    """Older PEFT wrote a LoRA layer's bias as ``<module>.bias`` rather than ``<module>.base_layer.bias``."""
    out = dict(weights)
    for k in expected:
        if k not in out and ".base_layer." in k:
            alias = k.replace(".base_layer.", ".")
            if alias in out:
                out[k] = out.pop(alias)
    return out


def _drop_wrapper_duplicates(weights: dict, saved: list) -> dict:
    """PEFT's ``bias="all"`` also writes the biases inside its modules_to_save wrappers,
    ``<module>.original_module.bias`` (the frozen base bias) and ``<module>.modules_to_save.bias`` (the
    trained copy's, saved again as ``<module>.bias``, which is the one that loads): drop these duplicates."""
    inner = tuple(f"{s}.{part}." for s in saved for part in ("original_module", "modules_to_save"))
    return {k: v for k, v in weights.items() if not k.startswith(inner)} if inner else weights


def _check_against(expected_shapes: dict, weights: dict, directory) -> None:
    missing = sorted(set(expected_shapes) - set(weights))
    unexpected = sorted(set(weights) - set(expected_shapes))
    if missing or unexpected:
        raise ValueError(f"adapter {os.fspath(directory)!r} does not fit the model: missing keys "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected keys "
                         f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for k, shape in expected_shapes.items():
        if tuple(weights[k].shape) != tuple(shape):
            raise ValueError(f"adapter tensor {k!r} must have shape {tuple(shape)} for this model, got "
                             f"{tuple(weights[k].shape)}")
        if not weights[k].is_floating_point():
            raise ValueError(f"adapter tensor {k!r} must be floating point, got {weights[k].dtype}")


def load_adapter(model: nn.Module, directory, adapter_name: str = "default", trainable: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA adapter from ``directory`` into ``model`` as ``adapter_name``; returns ``model``.

    - a model without adapters gets the LoRA layers injected from the saved config; the adapter is
      active, and trains unless ``trainable=False``;
    - a model with other adapters gets this one beside them (ranks may differ), inactive and frozen
      (``fastpeft.set_adapter`` activates it; ``fastpeft.mixed_batch`` routes it per sequence);
    - a model that already has ``adapter_name`` gets its weights replaced and the saved alphas applied.
    The config, every key and every shape are checked before the model changes.
    """
    check_adapter_name(adapter_name)
    if not isinstance(trainable, bool):
        raise TypeError(f"trainable must be a bool, got {trainable!r}")
    config = read_adapter_config(directory)
    weights = read_adapter_weights(directory)
    if isinstance(config, METHOD_CONFIGS):
        return _load_method(model, config, adapter_name, weights, directory, trainable)
    configs = adapter_configs(model)
    plan = plan_lora(model, config)
    sparse = _take_sparse(model, config, plan, weights, directory)
    if isinstance(config, SparseDeltaConfig):
        return _load_sparse_adapter(model, config, adapter_name, plan, sparse, weights, directory, trainable)
    expected = _expected_shapes(model, config, plan)
    weights = _resolve_aliases(expected, _drop_wrapper_duplicates(weights, plan.saved + _saved_modules(model)))
    _check_against(expected, weights, directory)

    if adapter_name in configs:
        if not isinstance(configs[adapter_name], LoraConfig):
            raise ValueError(f"adapter {adapter_name!r} of the model is a {type(configs[adapter_name]).__name__} "
                             f"adapter, the one in {os.fspath(directory)!r} a LoraConfig adapter: load it under "
                             "another adapter_name")
        layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapter_names}
        merged = [n for n, m in layers.items() if m.merged and m.active_adapter == adapter_name]
        if merged:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into layers {merged[:4]}: unmerge them before "
                               "loading over it")
        if set(plan.targets) != set(layers):
            raise ValueError(f"adapter config in {os.fspath(directory)!r} targets {sorted(plan.targets)}, but "
                             f"adapter {adapter_name!r} of the model is on {sorted(layers)}")
        for n, layer in layers.items():
            if plan.targets[n][0] != layer.adapter_spec(adapter_name).r:
                raise ValueError(f"adapter config gives {n!r} rank {plan.targets[n][0]}, the model's adapter "
                                 f"{adapter_name!r} has rank {layer.adapter_spec(adapter_name).r} there")
        for n, layer in layers.items():  # checks done: now update
            layer.update_adapter(adapter_name, lora_alpha=plan.targets[n][1], lora_dropout=config.lora_dropout,
                                 use_rslora=config.use_rslora)
        model._fastpeft_adapters = {**configs, adapter_name: config}
    else:
        inject(model, config, adapter_name, plan=plan, activate=not configs)

    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapter_names}
    keys = _adapter_keys(model, adapter_name, config, layers, _saved_modules(model))
    for name, (idx, vals) in sparse.items():  # the file's positions, never a new draw
        layers[name].set_sparse_delta(adapter_name, idx, vals)
        keys[name + _SPARSE_SUFFIXES[1]] = layers[name].sparse_values[adapter_name]
    with torch.no_grad():
        for k, p in keys.items():
            if k.endswith(_SPARSE_SUFFIXES[1]):
                continue
            p.copy_(weights[k])
    if active_adapter(model) == adapter_name:  # an adapter loaded beside others stays frozen
        for p in keys.values():
            p.requires_grad_(trainable)
    return model
