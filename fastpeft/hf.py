"""Hugging Face ``Trainer`` / TRL with models prepared by ``fastpeft.inject``, and ``fastpeft.to_peft``.

``transformers.Trainer`` treats only ``PeftModel`` specially: for any other model it saves the whole state
dict at every checkpoint, and resumes (``resume_from_checkpoint``, ``load_best_model_at_end``) by reading
``model.safetensors`` of the checkpoint into ``model.load_state_dict(state_dict, False)``. So ``inject``
gives the model two instance methods (``attach_trainer_support``):

- ``save_pretrained(directory, state_dict=None, is_main_process=True, ...)``, which Trainer calls for a
  ``PreTrainedModel``: PEFT's files for every adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``; adapter "default" at the top of ``directory``, the others in a subfolder
  named after them, as PEFT lays them out), and ``model.safetensors``, a hard link to the active adapter's
  ``adapter_model.safetensors`` (no second copy on disk), which is the file Trainer's resume reads;
- ``load_state_dict``, which loads a state dict keyed as PEFT's adapter files (``base_model.model.*``)
  into the active adapter through ``fastpeft.load_adapter`` and passes any other state dict to the
  model's own ``load_state_dict``.

Without fastpeft adapters (after ``merge_and_unload``, say) both are the model's own methods again.

PEFT's per-sequence ``adapter_names=[...]`` (``"__base__"`` for the base) is taken by the model's calls in eval mode
(a forward pre-hook runs the call inside ``fastpeft.mixed_batch``; ``model.forward(...)`` called directly bypasses
hooks) and by ``generate`` (an instance method, which expands the names as generate expands the batch):
``attach_adapter_names``.
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
import types

import torch
import torch.nn as nn

from ._checks import base_rewriting_init, few
from .inject import (INJECT_HOOKS, active_adapter, adapter_configs, lora_layers, method_for, mixed_batch,
                     nested_parameter_layers)
from .matching import input_embeddings, matches, output_head
from .io import adapter_files, load_adapter, read_adapter_config, save_adapter, write_adapter_files
from .layers import FastLoRALinear, ModulesToSaveWrapper

_PEFT_PREFIX = "base_model.model."
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TRAINER_WEIGHTS = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME: what Trainer's resume reads


def adapter_names(model: nn.Module) -> list:
    """The fastpeft adapters of ``model``, the active one first (empty: none)."""
    names = [] if active_adapter(model) is None else [active_adapter(model)]
    for layer in lora_layers(model).values():
        names += [n for n in layer.adapter_names if n not in names]
    return names


class _InstanceMethod:
    """``fn`` bound to ``model``, held in the model's ``__dict__``: a bound method that pickles. A
    ``types.MethodType`` pickles as ``getattr(model, name)``, which fails while pickle is still restoring the
    model's ``__dict__`` (this attribute among it): ``torch.save(model)`` then wrote a file ``torch.load`` could
    not read. This pickles as its function (by name) and the model (by reference)."""

    def __init__(self, fn, model):
        self.__func__, self.__self__ = fn, model
        self.__name__, self.__qualname__, self.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return _InstanceMethod, (self.__func__, self.__self__)

    @property
    def __signature__(self):  # the bound signature (Trainer and TRL inspect save_pretrained's arguments)
        return inspect.signature(types.MethodType(self.__func__, self.__self__))


def attach_trainer_support(model: nn.Module) -> nn.Module:
    """Give ``model`` the instance ``save_pretrained`` and ``load_state_dict`` described in the module
    docstring (idempotent); ``fastpeft.inject`` calls it (registered in ``INJECT_HOOKS`` below). Returns
    ``model``."""
    own = model.__dict__.get("save_pretrained")
    if not isinstance(own, _InstanceMethod) or own.__func__ is not _save_pretrained:
        model.save_pretrained = _InstanceMethod(_save_pretrained, model)
        model.load_state_dict = _InstanceMethod(_load_state_dict, model)
    return model


INJECT_HOOKS.append(attach_trainer_support)


def attach_adapter_names(model: nn.Module) -> nn.Module:
    """PEFT's ``adapter_names`` keyword on ``model``'s forward (and ``generate``, for transformers models), run as a
    ``fastpeft.mixed_batch`` block around the call (idempotent; ``inject`` calls it). Before 2026-12-01 a forward's
    ``adapter_names`` was swallowed by transformers' ``**kwargs`` and every row ran the active adapter."""
    if not any(h is _names_pre_hook for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_names_pre_hook, with_kwargs=True)
        model.register_forward_hook(_names_post_hook, always_call=True)  # also when the forward raises
    own = model.__dict__.get("generate")
    if callable(getattr(type(model), "generate", None)) and not (
            isinstance(own, _InstanceMethod) and own.__func__ is _generate):
        model.generate = _InstanceMethod(_generate, model)
    return model


INJECT_HOOKS.append(attach_adapter_names)
_ROUTED = "_fastpeft_routed"  # the model's open mixed_batch blocks of forwards given adapter_names


def _names_pre_hook(model, args, kwargs):
    if "adapter_names" not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    if names is None:
        return args, kwargs
    if model.training:
        # the block closes when the forward returns: an activation checkpoint's recomputation in backward would run
        # unrouted (the active adapter's gradients); PEFT refuses this too
        raise ValueError("adapter_names= is taken in eval mode only (as PEFT): in training, run the forward and its "
                         "backward inside `with fastpeft.mixed_batch(model, names):`")
    _check_batch(names, _batch_input(args, kwargs))
    block = mixed_batch(model, list(names) if isinstance(names, tuple) else names)
    block.__enter__()  # (raises, nothing entered, for unknown names)
    model.__dict__.setdefault(_ROUTED, []).append(block)
    return args, kwargs


def _batch_input(args, kwargs):
    """The tensor whose dim 0 is a forward's or generate's batch: the first of input_ids, inputs_embeds, inputs (given
    and not None), else the first positional argument."""
    for key in ("input_ids", "inputs_embeds", "inputs"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return args[0] if args else None


def _check_batch(names, inputs) -> None:
    """PEFT's check: one adapter name per sequence of the input batch (``inputs``: input_ids or inputs_embeds, dim 0;
    not checked when neither is a tensor). Layers that see the batch check it too, but a model whose LoRA layers all
    take its tokens flattened (a mixture of experts' expert weights) would otherwise split them into wrong runs."""
    if isinstance(names, (list, tuple)) and isinstance(inputs, torch.Tensor) and inputs.dim() >= 1 \
            and inputs.shape[0] != len(names):
        raise ValueError(f"adapter_names has {len(names)} names (one per sequence), but the input batch has "
                         f"{inputs.shape[0]} sequences (shape {tuple(inputs.shape)})")


def _names_post_hook(model, args, output):
    blocks = model.__dict__.get(_ROUTED)
    if blocks:
        blocks.pop().__exit__(None, None, None)


def _detach_adapter_names(model: nn.Module) -> list:
    """Take ``attach_adapter_names``' hooks off ``model``; returns what ``_reattach`` puts back."""
    taken = []
    for table, flags in (("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
                         ("_forward_hooks", "_forward_hooks_always_called")):
        hooks = getattr(model, table)
        for key, hook in list(hooks.items()):
            if hook in (_names_pre_hook, _names_post_hook):
                taken.append((table, flags, key, hook, getattr(model, flags).pop(key, None)))
                del hooks[key]
    return taken


def _reattach(model: nn.Module, taken: list) -> None:
    for table, flags, key, hook, flag in taken:
        getattr(model, table)[key] = hook
        if flag is not None:
            getattr(model, flags)[key] = flag


def _generate(self, *args, adapter_names=None, **kwargs):
    """The model's ``generate``; with ``adapter_names`` (one per input sequence, ``"__base__"`` for the base) inside
    ``fastpeft.mixed_batch``, each sequence's ``num_beams`` (beam search) or ``num_return_sequences`` rows on its
    adapter."""
    own = _own(self, "generate")
    if adapter_names is None:
        return own(*args, **kwargs)
    config = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None) or \
        getattr(self, "generation_config", None)  # (generate(inputs, generation_config, ...))
    _check_batch(adapter_names, _batch_input(args, kwargs))
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    copies = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    with mixed_batch(self, list(adapter_names), rows_per_sequence=beams if beams > 1 else copies):
        return own(*args, **kwargs)


def _own(model: nn.Module, name: str):
    """The model's class method ``name`` (what the instance attribute hides), or None."""
    fn = getattr(type(model), name, None)
    return types.MethodType(fn, model) if fn is not None else None


def _save_pretrained(self, save_directory, state_dict=None, is_main_process=True, selected_adapters=None,
                     **kwargs):
    """Write the fastpeft adapters of this model in PEFT's format (the base model is not written).

    state_dict: the model's state dict to take the adapter tensors from (Trainer passes one gathered under
    FSDP / DeepSpeed); None: the model's parameters. is_main_process: False writes nothing (the tensors are
    still gathered, so every rank of an FSDP2 job may call it). selected_adapters: the adapters to write
    (default: all). ``path_initial_model_for_weight_conversion`` (PEFT's): each adapter written as plain LoRA on the
    original weights (``fastpeft.save_adapter``). Other keyword arguments of ``PreTrainedModel.save_pretrained``
    (``safe_serialization``, ``max_shard_size``, ...) are accepted and have no effect: the files are always
    safetensors, one each.
    """
    names = adapter_names(self)
    if not names:
        own = _own(self, "save_pretrained")
        if own is None:
            raise ValueError(f"{type(self).__name__} holds no fastpeft adapter and has no save_pretrained of its own")
        flag = self.__dict__.pop("_hf_peft_config_loaded", None)  # (inject's mark: no PEFT adapter to save here)
        try:
            return own(save_directory, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
        finally:
            if flag is not None:
                self._hf_peft_config_loaded = flag
    if kwargs.get("push_to_hub"):
        raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported for fastpeft models: save, "
                                  "then upload the folder with huggingface_hub")
    if selected_adapters is not None:
        unknown = [n for n in selected_adapters if n not in names]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} are not adapters of this model; it has {names}")
        names = [n for n in names if n in selected_adapters]
    directory = os.fspath(save_directory)
    if os.path.isfile(directory):
        raise ValueError(f"save_directory {directory!r} is a file, not a folder")
    initial = kwargs.get("path_initial_model_for_weight_conversion")
    with _parameters_from(self, state_dict):  # every adapter's files built (and checked) before any is written
        files = {name: adapter_files(self, name, is_main_process, initial) for name in names}
    for name, built in files.items():
        write_adapter_files(*built, _adapter_dir(directory, name))
    active = active_adapter(self)
    if is_main_process and active in names:
        _link(os.path.join(_adapter_dir(directory, active), _ADAPTER_WEIGHTS), os.path.join(directory, _TRAINER_WEIGHTS))


def _adapter_dir(directory: str, name: str) -> str:
    return directory if name == "default" else os.path.join(directory, name)


def _link(src: str, dst: str) -> None:
    """``dst`` = ``src``'s bytes: a hard link where the filesystem has them, else a copy."""
    import shutil

    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class _parameters_from:
    """Within the block, the model's parameters named in ``state_dict`` hold its tensors (``.data`` swapped,
    nothing copied); None: a no-op."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict, self.saved = model, state_dict, []

    def __enter__(self):
        if self.state_dict is None:
            return
        params = dict(self.model.named_parameters())
        if any(type(p) is not nn.Parameter for p in params.values()):
            raise ValueError("save_pretrained(state_dict=...) on sharded parameters (FSDP2 DTensors): call it "
                             "without state_dict on every rank, which gathers the adapter")
        for name, t in self.state_dict.items():
            p = params.get(name)
            if p is not None and isinstance(t, torch.Tensor) and t.shape == p.shape:
                self.saved.append((p, p.data))
                p.data = t.detach()

    def __exit__(self, *exc):
        for p, data in self.saved:
            p.data = data
        self.saved = []


def _adapter_keys(model: nn.Module, keys: list) -> bool:
    """Whether ``keys`` are those of an adapter file of the model's active adapter's method: every key under its
    prefix (``base_model.model.``; a prompt's ``base_model.``) or one of its root keys, one of which it holds (a
    prompt file's ``prompt_embeddings``). Without an active adapter: PEFT's LoRA prefix (load_state_dict says)."""
    config = adapter_configs(model).get(active_adapter(model))
    if config is None:
        return all(k.startswith(_PEFT_PREFIX) for k in keys)
    method = method_for(config)
    return all(k in method.root_keys or k.startswith(method.file_prefix) for k in keys) and (
        not method.root_keys or any(k in method.root_keys for k in keys))


def _load_state_dict(self, state_dict, strict=True, assign=False):
    """A state dict keyed as PEFT's adapter files (what ``save_pretrained`` links as ``model.safetensors``)
    goes into the active adapter through ``fastpeft.load_adapter``; any other to the model's own method."""
    keys = list(state_dict.keys()) if hasattr(state_dict, "keys") else []
    if not keys or not adapter_names(self) or not _adapter_keys(self, keys):
        return type(self).load_state_dict(self, state_dict, strict=strict, assign=assign)
    from safetensors.torch import save_file

    name = active_adapter(self)
    if name is None:
        raise ValueError("load_state_dict got an adapter state dict (base_model.model.* keys), but the model has no "
                         f"active adapter to load it into; it has {adapter_names(self)}: fastpeft.set_adapter one")
    with tempfile.TemporaryDirectory(prefix="fastpeft-resume-") as tmp:
        # the adapter's config (its weights replaced by the state dict's), on every rank: its own temporary folder
        save_adapter(self, tmp, name, is_main_process=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()},
                  os.path.join(tmp, _ADAPTER_WEIGHTS), metadata={"format": "pt"})
        try:
            load_adapter(self, tmp, name)
        except ValueError as e:  # name the state dict, not the temporary folder it went through
            msg = str(e).replace(f"adapter {tmp!r}", "the state dict").replace(tmp, "the state dict")
            raise ValueError(f"load_state_dict into fastpeft adapter {name!r}: {msg}") from None
    return torch.nn.modules.module._IncompatibleKeys([], [])


# ---------------------------------------------------------------------------------------------------------
# fastpeft -> PEFT
# ---------------------------------------------------------------------------------------------------------
def _check_tied_token_adapters(model: nn.Module, specs: dict) -> None:
    """Refuse token adapters ``specs`` (name -> trainable_token_indices) PEFT loads into one model with other outputs:
    on tied input embeddings and output head, some whose head follows the embeddings' rows (a list, or a dict not
    naming the head) beside some giving the head ids of its own (a reviewed case: the later adapter's logits 1.67 off
    after PEFT loaded both; fastpeft's were right)."""
    head, emb = output_head(model), input_embeddings(model)
    if len(specs) < 2 or head is None or emb is None:
        return
    def weight(m):
        return getattr(getattr(m, "original_module", m), "weight", None)
    if weight(head) is None or weight(head) is not weight(emb):
        return
    head_name = next((n for n, m in model.named_modules() if m is head), "")
    emb_name = next((n for n, m in model.named_modules() if m is emb), "")

    def ids_for(spec: dict, name: str):
        return next((list(v) for k, v in spec.items() if matches([k], name)), None)
    # a dict giving the head the embeddings' own ids is a list for a tied model (PEFT converts it exactly)
    own = {n for n, spec in specs.items() if isinstance(spec, dict) and ids_for(spec, head_name) is not None
           and ids_for(spec, head_name) != ids_for(spec, emb_name)}
    if own and own != set(specs):
        raise ValueError(f"fastpeft.to_peft: on tied embeddings and output head, adapters {sorted(own)} give the head "
                         f"token ids of their own and {sorted(set(specs) - own)} let it follow the embeddings' rows; "
                         "PEFT loads such adapters into one model with other outputs: convert them separately "
                         "(fastpeft.save_adapter each, then PEFT's from_pretrained)")


def to_peft(model: nn.Module):
    """A model prepared by ``fastpeft.inject`` (LoRA adapters) as a real ``peft.PeftModel``, in place.

    Every adapter goes through PEFT's own files (``fastpeft.save_adapter`` -> ``PeftModel.from_pretrained``
    / ``load_adapter``) onto the same base modules, so the PeftModel holds the same weights and gives the same
    outputs; the active adapter stays active and is the one that trains. The fastpeft layers are replaced by
    the ``nn.Linear`` modules they wrap (sharing their weights), in the model's training mode (an eval model stays
    in eval: no dropout). Raises before changing anything for what PEFT cannot hold: sparse deltas, the other
    fastpeft methods, merged layers.
    """
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"fastpeft.to_peft needs Hugging Face PEFT ({e}): pip install peft") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpeft.to_peft takes a model prepared by fastpeft.inject, got a {type(model).__name__}")
    names = adapter_names(model)
    if not names:
        raise TypeError(f"fastpeft.to_peft takes a model prepared by fastpeft.inject; {type(model).__name__} holds "
                        "no fastpeft adapter")
    merged = [n for n, m in lora_layers(model).items() if m.merged]
    if merged:
        raise ValueError(f"fastpeft.to_peft: layers {few(merged)} have a merged adapter; unmerge them first")
    active = active_adapter(model)
    if active is None:
        raise ValueError(f"fastpeft.to_peft: the model has no active adapter (adapters {names}); fastpeft.set_adapter "
                         "the one PEFT should make active")
    configs = adapter_configs(model)
    tokens = [n for n in names if getattr(configs[n], "trainable_token_indices", None) is not None]
    if tokens and len(tokens) != len(names):  # PEFT's load_adapter then fails half way (a KeyError)
        raise ValueError(f"fastpeft.to_peft: adapters {tokens} train tokens and {[n for n in names if n not in tokens]}"
                         " do not; PEFT cannot load both kinds into one model: convert them separately "
                         "(fastpeft.save_adapter each, then PEFT's from_pretrained)")
    _check_tied_token_adapters(model, {n: configs[n].trainable_token_indices for n in tokens})
    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="fastpeft-to-peft-") as tmp:
        dirs, rewritten = {}, {}
        for name in names:
            dirs[name] = os.path.join(tmp, name)
            save_adapter(model, dirs[name], name, is_main_process=True)  # (every rank: its own temporary folder)
            config_path = os.path.join(dirs[name], "adapter_config.json")
            with open(config_path) as f:
                raw = json.load(f)
            if base_rewriting_init(raw.get("init_lora_weights")) is not None:
                # PiSSA / OLoRA / LoftQ: the base weights are the residual (Q) already; PEFT would rewrite again
                rewritten[name] = raw["init_lora_weights"], raw.get("loftq_config") or {}, raw.get("corda_config")
                with open(config_path, "w") as f:
                    json.dump(dict(raw, init_lora_weights=True, loftq_config={}, corda_config=None), f)
            config = read_adapter_config(dirs[name])
            peft_type = raw.get("peft_type")
            if peft_type != "LORA" or getattr(config, "sparse_density", 0.0) > 0:
                what = ("a sparse delta (RoSA)" if getattr(config, "sparse_density", 0.0) > 0 else
                        f"a {type(config).__name__} adapter")
                hint = ("PEFT loads its files: fastpeft.save_adapter, then peft.PeftModel.from_pretrained"
                        if peft_type == "PROMPT_TUNING" else "PEFT has no equivalent of it")
                raise ValueError(f"fastpeft.to_peft: adapter {name!r} is {what}; only LoRA adapters convert in place "
                                 f"({hint})")
        # Checks done: swap the fastpeft modules for their base modules (the files hold the adapters), then load
        # the adapters with PEFT. Should PEFT raise, the fastpeft modules and attributes go back where they were.
        nested = nested_parameter_layers(model, lora_layers(model))
        swapped = list(lora_layers(model).items()) + [
            (n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        kept = {name: v for name, v in model.__dict__.items()
                if name in _FASTPEFT_ATTRS or isinstance(v, _InstanceMethod)}  # the registry, Trainer's methods
        before = set(model.__dict__)
        hooks = _detach_adapter_names(model)  # PEFT's forward takes adapter_names itself
        try:
            for path, m in swapped:
                if path in nested:
                    continue  # (nested in the layer outside it, which gives the module back)
                _set_submodule(model, path, m.original_module if isinstance(m, ModulesToSaveWrapper)
                               else _base_module(m))
            for name in kept:
                del model.__dict__[name]
            peft_model = peft.PeftModel.from_pretrained(model, dirs[active], adapter_name=active, is_trainable=True)
            for name in names:
                if name != active:
                    peft_model.load_adapter(dirs[name], adapter_name=name, is_trainable=False)
            for name, (init, loftq, corda) in rewritten.items():  # PEFT's config as get_peft_model keeps it: its
                peft_model.peft_config[name].init_lora_weights = init  # save writes "pissa", which then loads on the
                peft_model.peft_config[name].loftq_config = loftq      # original model
                if corda is not None:
                    from peft.tuners.lora.config import CordaConfig
                    peft_model.peft_config[name].corda_config = CordaConfig(**corda)
        except BaseException:
            for path, m in swapped:
                _set_submodule(model, path, m)
            for name in set(model.__dict__) - before:  # what PEFT set on the model before it failed (peft_config)
                del model.__dict__[name]
            model.__dict__.update(kept)
            _reattach(model, hooks)
            raise
    return peft_model.train(was_training)  # from_pretrained(is_trainable=True) leaves it in training mode


# The model's attributes fastpeft sets for its adapters (besides Trainer's methods); gone after to_peft (the
# PeftModel then holds the adapters: transformers' mark of them too, which inject sets on quantized models).
_FASTPEFT_ATTRS = ("_fastpeft_adapters", "_fastpeft_active", "_fastpeft_trained", "_hf_peft_config_loaded")


def _base_module(layer: FastLoRALinear) -> nn.Module:
    """The module PEFT wraps in ``layer``'s place, ``layer.base_module()``: a QLoRA layer's bitsandbytes layer itself
    (PEFT's ``lora.bnb`` layers then read its packed weight), a ``FastLoRAParameter``'s module itself (PEFT nests its
    ParamWrapper layers there), else an nn.Linear (a Conv1D, an nn.Embedding, a convolution, for a layer made from
    one) holding ``layer``'s weight and bias (no copy)."""
    return layer.base_module()


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ---------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------
def check_sft_model(model, peft_config=None) -> None:
    """Raise if ``model`` (a fastpeft model) cannot go to TRL's ``SFTTrainer`` as it is: with a ``peft_config``
    as well (PEFT would wrap fastpeft's layers), or with LoRA on the output head (TRL's chunked loss reads
    ``lm_head.weight`` directly, so the adapter there would be ignored and never trained)."""
    if not isinstance(model, nn.Module) or not adapter_names(model):
        return
    if peft_config is not None:
        raise ValueError(f"the model already holds fastpeft adapters {adapter_names(model)}; pass it to SFTTrainer "
                         "without peft_config (or pass the plain base model with peft_config to train PEFT's own "
                         "adapters)")
    head = output_head(model)
    if isinstance(head, FastLoRALinear):
        how = ("target_parameters without lm_head.weight" if hasattr(head, "parameter_name") else
               "exclude_modules=['lm_head'] (or target_modules without it)")
        raise ValueError("LoRA sits on the output head (lm_head): TRL's SFTTrainer computes the log-probabilities "
                         "from lm_head.weight directly, so that adapter would be ignored and never trained; inject "
                         f"with {how}")


_sft_class = None


def _sft_trainer_class():
    global _sft_class
    if _sft_class is None:
        import trl

        signature = inspect.signature(trl.SFTTrainer.__init__)

        class SFTTrainer(trl.SFTTrainer):
            """TRL's ``SFTTrainer`` for fastpeft models: the same trainer, after ``check_sft_model``."""

            def __init__(self, *args, **kwargs):
                bound = signature.bind(self, *args, **kwargs).arguments
                check_sft_model(bound.get("model"), bound.get("peft_config"))
                super().__init__(*args, **kwargs)

        SFTTrainer.__module__ = __name__
        _sft_class = SFTTrainer
    return _sft_class


def __getattr__(name):  # trl is imported only when SFTTrainer is asked for
    if name == "SFTTrainer":
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
