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

from .inject import (LoraConfig, ModulesToSaveWrapper, adapter_configs, inject, is_bias, lora_layers,
                     pattern_value, plan_lora)
from .layers import lora_scaling

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


def _adapter_keys(model: nn.Module, adapter_name: str, config: LoraConfig, layers: dict, saved: list) -> dict:
    """File key -> the model's parameter that it holds, for adapter ``adapter_name``."""
    keys = {}
    for name, layer in layers.items():
        keys[f"{name}.lora_A.weight"] = layer.lora_A
        keys[f"{name}.lora_B.weight"] = layer.lora_B
    wrapped = {}
    for name in saved:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.modules_to_save[adapter_name]
        wrapped[name] = module
        for pname, p in module.named_parameters():
            keys[f"{name}.{pname}"] = p
    if config.bias == "lora_only":
        for name, layer in layers.items():
            if layer.bias is not None:
                keys[f"{name}.base_layer.bias"] = layer.bias
    elif config.bias == "all":
        for mname, module in model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) or any(
                    mname == s or mname.startswith(s + ".") for s in saved):
                continue
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if is_bias(full):
                    keys[f"{mname}.base_layer.{pname}" if mname in layers else full] = p
    return keys


def _saved_modules(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _config_json(model: nn.Module, config: LoraConfig, layers: dict) -> dict:
    d = {k: getattr(config, k) for k in _CONFIG_FIELDS}
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


def save_adapter(model: nn.Module, directory, adapter_name: str = "default") -> None:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's format, atomically.

    The files are written to a temporary folder beside ``directory`` and renamed into place; other files
    already in ``directory`` are kept. A failure leaves ``directory`` as it was.
    """
    from safetensors.torch import save_file

    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of this model; it has {list(configs)}")
    config = configs[adapter_name]
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapter_names}
    keys = _adapter_keys(model, adapter_name, config, layers, _saved_modules(model))
    tensors = {PREFIX + k: p.detach().to("cpu").contiguous().clone() for k, p in keys.items()}

    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory {directory!r} exists and is not a folder")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(_config_json(model, config, layers), f, indent=2, sort_keys=True)
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
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter_config(directory) -> LoraConfig:
    """The ``LoraConfig`` in ``directory/adapter_config.json``; raises for other PEFT types and for LoRA
    variants fastpeft cannot compute (DoRA, layer replication, ...)."""
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
    if d.get("peft_type") != "LORA":
        raise ValueError(f"peft_type in {path} must be 'LORA', got {d.get('peft_type')!r}")
    bad = {k: d[k] for k in _UNSUPPORTED if d.get(k) not in (None, False, [], {}, 0)}
    if bad:
        raise ValueError(f"adapter config {path} uses LoRA variants fastpeft does not compute: {bad}")
    init = d.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        # PiSSA, OLoRA, LoftQ, ... change the base weights at init: the adapter alone does not carry them.
        raise ValueError(f"init_lora_weights={init!r} in {path}: adapters initialised this way modify the "
                         "base weights and cannot be loaded onto the original model")
    kwargs = {k: d[k] for k in _CONFIG_FIELDS if k in d and d[k] is not None}
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
    """Load a PEFT-format LoRA adapter from ``directory`` into ``model``; returns ``model``.

    A model without LoRA layers gets them injected from the saved config first, as adapter
    ``adapter_name``. A model that already has adapter ``adapter_name`` has its weights replaced, and the
    saved config's alphas applied. Every key, shape and the config are checked before the model changes.
    ``trainable=False`` freezes the loaded adapter (inference).
    """
    config = read_adapter_config(directory)
    weights = read_adapter_weights(directory)
    configs = adapter_configs(model)
    if configs and adapter_name not in configs:
        raise ValueError(f"model already has adapter(s) {list(configs)}; loading a second one "
                         f"({adapter_name!r}) beside them is not supported yet")

    if not configs:
        plan = plan_lora(model, config)
        expected = {}
        for name, (r, _) in plan.targets.items():
            lin = model.get_submodule(name)
            expected[f"{name}.lora_A.weight"] = (r, lin.in_features)
            expected[f"{name}.lora_B.weight"] = (lin.out_features, r)
            if config.bias == "lora_only" and lin.bias is not None:
                expected[f"{name}.base_layer.bias"] = tuple(lin.bias.shape)
        for name in plan.saved:
            for pname, p in model.get_submodule(name).named_parameters():
                expected[f"{name}.{pname}"] = tuple(p.shape)
        if config.bias == "all":
            for pname, p in model.named_parameters():
                if is_bias(pname) and not any(pname.startswith(s + ".") for s in plan.saved):
                    mod, _, leaf = pname.rpartition(".")
                    expected[f"{mod}.base_layer.{leaf}" if mod in plan.targets else pname] = tuple(p.shape)
        weights = _resolve_aliases(expected, _drop_wrapper_duplicates(weights, plan.saved))
        _check_against(expected, weights, directory)
        inject(model, config, adapter_name, plan=plan)
    else:
        layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapter_names}
        saved = _saved_modules(model)
        keys = _adapter_keys(model, adapter_name, config, layers, saved)
        weights = _resolve_aliases(keys, _drop_wrapper_duplicates(weights, saved))
        _check_against({k: tuple(p.shape) for k, p in keys.items()}, weights, directory)
        targets = plan_lora(model, config, existing=True).targets
        if set(targets) != set(layers):
            raise ValueError(f"adapter config in {os.fspath(directory)!r} targets {sorted(targets)}, but adapter "
                             f"{adapter_name!r} of the model is on {sorted(layers)}")
        for n, layer in layers.items():
            if targets[n][0] != layer.r:
                raise ValueError(f"adapter config gives {n!r} rank {targets[n][0]}, the model's layer has {layer.r}")
        for n, layer in layers.items():  # checks done: now update
            layer.lora_alpha = pattern_value(config.alpha_pattern, n, config.lora_alpha)
            layer.use_rslora = config.use_rslora
            layer.lora_dropout = config.lora_dropout
            layer.scaling = lora_scaling(layer.r, layer.lora_alpha, layer.use_rslora)
        model._fastpeft_adapters = {adapter_name: config}

    keys = _adapter_keys(model, adapter_name, config,
                         {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapter_names},
                         _saved_modules(model))
    with torch.no_grad():
        for k, p in keys.items():
            p.copy_(weights[k])
            p.requires_grad_(trainable)
    return model
