"""Adapter files in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What a file holds is its method family's (``inject.method_for``, by config or by ``peft_type``): the
config's JSON and the tensors' keys, relative to ``base_model.model.`` (LoRA: ``<module>.lora_A.weight``,
...). This module reads and writes the two files. Saves are atomic (each file written whole beside its target,
then renamed over it, the previous ones put back where a step fails); loads read and check the config, every key
and every shape before the model is touched, and never unpickle anything.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
import warnings

import torch
import torch.nn as nn

from ._checks import base_rewriting_init, check_adapter_name, check_bool, few
from .inject import METHODS, LoraPlan, adapter_configs, check_known, inject, method_for, peft_state, with_init
from .layers import LOFTQ_SCALING_WARNING, param_base
from .quant import is_quantized

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


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


def write_folder_atomically(directory, files: dict) -> None:
    """Write ``files`` (file name -> a function writing that file to the path it is given) into ``directory``, all or
    nothing, in place: each is written whole to a temporary name inside the folder and flushed to disk, then they are
    renamed over their targets one after the other (each rename atomic, the first to the last microseconds apart).
    Where a write or a rename fails, the files already renamed are put back (hard links kept the previous ones) and
    the temporaries removed: the folder is as it was (a new folder is removed again, if still empty). Concurrent
    saves into one folder take turns (``_folder_lock``). Nothing else in the folder is touched: other files, open
    files (a training log keeps its writes), its permissions, a symlinked folder's target, a mount point, the
    working directory (before 2026-12-01 the whole folder was rebuilt beside it and swapped in, which lost all of
    those)."""
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory {os.path.abspath(directory)!r} exists and is not a folder")
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    with _folder_lock(directory):
        _write_files(directory, files, created)


@contextlib.contextmanager
def _folder_lock(directory: str):
    """An exclusive lock on ``directory`` (``flock`` on the folder itself, no lock file) while a save writes into
    it: two processes saving into one folder take turns, so neither's files end up beside the other's (a config of
    one save with the weights of another). Where there is no ``fcntl`` (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    _LOCK_FDS.add(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _LOCK_FDS.discard(fd)
        os.close(fd)  # (releases the lock)


# flock belongs to the open file description, which a fork duplicates: a process forked while a save holds the lock
# (a DataLoader worker started by another thread) would hold it on until it exits. Children close their copies.
_LOCK_FDS: set = set()


def _close_lock_fds_in_child() -> None:
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lock_fds_in_child)


def _write_files(directory: str, files: dict, created: bool) -> None:
    """``write_folder_atomically``'s writes and renames, under the folder's lock."""
    os.makedirs(directory, exist_ok=True)  # (a save that made the folder and failed while this one waited removed it)
    tag = uuid.uuid4().hex[:12]
    tmps = {name: os.path.join(directory, f".{name}.tmp-{tag}") for name in files}
    backups, renamed = {}, []
    try:
        for name, write in files.items():
            write(tmps[name])
            with open(tmps[name], "rb+") as f:
                os.fsync(f.fileno())
        for name in files:
            target = os.path.join(directory, name)
            if os.path.isfile(target):  # the previous file, kept under a second name until the renames are done
                backups[name] = os.path.join(directory, f".{name}.old-{tag}")
                try:
                    os.link(target, backups[name])
                except OSError:  # a file system without hard links
                    shutil.copy2(target, backups[name])
        for name in files:
            os.replace(tmps[name], os.path.join(directory, name))
            renamed.append(name)
        _fsync_dir(directory)
    except BaseException:
        for name in renamed:  # put the previous files back (a file that was not there: removed)
            target = os.path.join(directory, name)
            if name in backups:
                os.replace(backups.pop(name), target)
            else:
                os.remove(target)
        for path in [*tmps.values(), *backups.values()]:
            if os.path.lexists(path):
                os.remove(path)
        if created:
            try:  # a folder this call made, if nothing else came into it meanwhile
                os.rmdir(directory)
            except OSError:
                pass
        raise
    for path in backups.values():
        os.remove(path)


def _meta_parameters(model: nn.Module, plan, state) -> list:
    """Names of the parameters on meta that a load of ``plan`` writes into, or creates adapters beside: the LoRA /
    sparse targets and saved modules (a ``LoraPlan``), a parameter method's tensors (its plan, or ``state.trained``
    on a reload) that exist already."""
    if isinstance(plan, LoraPlan):
        return [f"{m}.{n}" for m in [*plan.targets, *plan.saved] if m not in plan.params
                for n, p in model.get_submodule(m).named_parameters() if p.is_meta] + \
            [f"{base}.{pn}" for base, pn in plan.params.values() if getattr(param_base(model.get_submodule(base)),
                                                                             pn).is_meta]
    params = dict(model.named_parameters(remove_duplicate=False))
    return [n for n in (plan if plan is not None else state.trained) if n in params and params[n].is_meta]


def save_adapter(model: nn.Module, directory, adapter_name: str = "default", is_main_process: bool | None = None,
                 path_initial_model_for_weight_conversion=None) -> None:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in PEFT's format, atomically.

    Each file is written whole to a temporary name in ``directory``, then renamed over its target
    (``write_folder_atomically``); other files already in ``directory`` are left as they are. A failure leaves
    ``directory`` as it was.

    Distributed (a process group initialized): by default only global rank 0 writes, so every rank may call it
    (under DDP with the wrapper or its ``.module``; before 2026-12-01 every DDP rank wrote, and concurrent renames
    could fail); other ranks reading the folder afterwards wait for rank 0 first (``dist.barrier()``). Under FSDP2
    (``fully_shard``) the adapter's parameters are sharded DTensors: every rank must call it, since gathering them
    is a collective. ``is_main_process`` (PEFT's argument) overrides which callers write (True: this one, say a
    folder of its own).

    ``path_initial_model_for_weight_conversion`` (PEFT's argument): a folder holding the same adapter as saved right
    after it was made. The file then written is plain LoRA on the original base weights, of rank 2r: an adapter made
    with PiSSA / OLoRA trains on the residual W - s B0 A0, and [A; A0], [B, -B0] (r and alpha doubled; with rslora
    alpha times √2, so s stays) give (W - s B0 A0) + s B A = W + s [B, -B0] [A; A0] on W itself. Any LoRA adapter
    converts so: to its change since the initial adapter, which is the adapter itself under PEFT's default init
    (B0 = 0), and is warned of for the other inits (PEFT's warning). PEFT's file keys, config and factors (tested);
    PEFT's own conversion (0.21) leaves DoRA magnitudes, embedding factors and modules_to_save copies out of its
    file, so its output differs there.
    """
    write_adapter_files(*adapter_files(model, adapter_name, is_main_process, path_initial_model_for_weight_conversion),
                        directory)


def adapter_files(model: nn.Module, adapter_name: str = "default", is_main_process: bool | None = None,
                  path_initial_model_for_weight_conversion=None) -> tuple:
    """``(config_json, tensors, writes)``: what ``save_adapter`` writes for adapter ``adapter_name`` (tensors on the
    CPU, FSDP2 shards gathered), converted to plain LoRA on the original weights with
    ``path_initial_model_for_weight_conversion``, and whether this process writes it. Checks everything; writes
    nothing (a save of several adapters builds them all first)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    configs = adapter_configs(model)
    check_known(model, adapter_name, configs)
    config, state = configs[adapter_name], peft_state(model)
    method = method_for(config)
    keys = method.file_tensors(model, config, adapter_name, state)
    config_json = method.config_to_json(model, config, adapter_name, state)
    if config_json.get("task_type") is None:  # as PEFT: how AutoPeftModel finds the model class (before 2026-12-01
        # left out: AutoPeftModelForCausalLM could not open such a folder, a Trainer checkpoint without task_type)
        config_json.setdefault("auto_mapping", {"base_model_class": type(model).__name__,
                                                "parent_library": type(model).__module__})
    sharded = any(_sharded(p) for p in keys.values())
    # full_tensor() all-gathers an FSDP2 shard; every rank runs the gathers, in the same (key) order.
    tensors = {(k if k in method.root_keys else method.file_prefix + k):
               (p.detach().full_tensor() if _sharded(p) else p.detach()).to("cpu").contiguous().clone()
               for k, p in keys.items()}
    if path_initial_model_for_weight_conversion is not None:
        config_json, tensors = _converted_to_lora(config_json, tensors, path_initial_model_for_weight_conversion,
                                                  method.file_prefix, adapter_name)
    if is_main_process is None:
        dist = torch.distributed
        is_main_process = not (sharded or dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    return config_json, tensors, bool(is_main_process)


def write_adapter_files(config_json: dict, tensors: dict, writes: bool, directory) -> None:
    """Write ``adapter_files``' result into ``directory``, atomically (nothing where ``writes`` is False)."""
    from safetensors.torch import save_file

    if not writes:
        return

    def write_config(path):
        with open(path, "w") as f:
            # top-level keys sorted, nested ones in their order: rank_pattern / alpha_pattern keys are tried in order
            # (the first match wins, here and in PEFT), so sorting them could give a layer another rank or alpha
            json.dump(dict(sorted(config_json.items())), f, indent=2)

    write_folder_atomically(directory, {WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
                                        CONFIG_NAME: write_config})


# A LoRA factor's file key (group 1: lora_A / lora_B / lora_embedding_A / _B), or lora_B's bias (group 1 None)
_FACTOR_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$|\.lora_B\.bias$")


def _converted_to_lora(config_json: dict, tensors: dict, initial, prefix: str, adapter_name: str) -> tuple:
    """``(config, tensors)`` of a LoRA adapter's file as plain LoRA on the original base weights
    (``save_adapter``'s ``path_initial_model_for_weight_conversion``): every A / B concatenated with the initial
    adapter's along the rank ([A; A0], [B, -B0]), a lora_B bias less its initial value, r and rank_pattern doubled,
    alpha and alpha_pattern times 2 (√2 with rslora), init_lora_weights True. Checks everything first."""
    where = f"path_initial_model_for_weight_conversion={os.fspath(initial)!r}"
    if config_json.get("peft_type") != "LORA":
        raise ValueError(f"{where}: adapter {adapter_name!r} is a {config_json.get('peft_type')} adapter; only LoRA "
                         "adapters convert (PEFT's rule)")
    if config_json.get("target_parameters"):
        raise ValueError(f"{where}: adapter {adapter_name!r} adapts target_parameters, whose factors are laid out per "
                         "expert (r E): doubling r there is not offered")
    init = config_json.get("init_lora_weights", True)
    if init == "loftq":
        raise ValueError(f"{where}: adapter {adapter_name!r} was made with LoftQ, whose base is the quantized W, not "
                         "the original W less a low-rank part: it does not convert to LoRA on the original weights "
                         "(PEFT's conversion is for PiSSA / OLoRA); save it as it is and load it on the quantized base")
    if init is not True and base_rewriting_init(init) is None:  # (PEFT's warning)
        warnings.warn(f"{where}: adapter {adapter_name!r} was made with init_lora_weights={init!r}, which leaves the "
                      "base weights as they are: the file written holds its change since the initial adapter "
                      "(s B A - s B0 A0), not the adapter", UserWarning, stacklevel=3)
    first = read_adapter_weights(initial, prefix)
    path = os.path.join(os.fspath(initial), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no {CONFIG_NAME} there (the initial adapter's config)")
    with open(path) as f:
        first_config = json.load(f)
    for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora"):
        mine, theirs = config_json.get(field), first_config.get(field)
        if (mine or None) != (theirs or None):  # (an absent or empty field is PEFT's default)
            raise ValueError(f"{where}: the initial adapter has {field}={theirs!r}, adapter {adapter_name!r} "
                             f"{field}={mine!r}; that folder must hold this adapter as saved right after it was made")
    extra = sorted(k for k in first if _FACTOR_KEY.search(k) and prefix + k not in tensors and k not in tensors)
    if extra:
        raise ValueError(f"{where}: the initial adapter has {few(extra)}, which adapter {adapter_name!r} does not; "
                         "that folder must hold this adapter as saved right after it was made")
    out = dict(tensors)
    for key in tensors:  # a target's saved base weight (an untied head's) is the model's W, the residual after PiSSA
        # (also where the config no longer says so: residual=True): left out, so that the file goes on the original
        # weights, as PEFT's conversion leaves it out
        if key.endswith(".base_layer.weight") and key[:-len("base_layer.weight")] + "lora_A.weight" in tensors:
            del out[key]
    for key, t in tensors.items():
        k = key[len(prefix):] if key.startswith(prefix) else key
        factor = _FACTOR_KEY.search(k)
        if factor is None or key not in out:
            continue
        if k not in first or tuple(first[k].shape) != tuple(t.shape):
            got = "missing" if k not in first else f"of shape {tuple(first[k].shape)}"
            raise ValueError(f"{where}: the initial adapter's {k} is {got}, where adapter {adapter_name!r} has "
                             f"{tuple(t.shape)}; that folder must hold this adapter as saved right after it was made")
        t0 = first[k].to(t.dtype)
        if factor.group(1) is None:  # lora_B's bias (lora_bias=True)
            out[key] = t - t0
        elif factor.group(1).endswith("A"):
            out[key] = torch.cat([t, t0], dim=0)
        else:
            out[key] = torch.cat([t, -t0], dim=1)
    factor = 2 ** 0.5 if config_json.get("use_rslora") else 2
    config = dict(config_json, init_lora_weights=True, r=2 * config_json["r"],
                  lora_alpha=config_json["lora_alpha"] * factor)
    config["rank_pattern"] = {k: 2 * v for k, v in (config_json.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: v * factor for k, v in (config_json.get("alpha_pattern") or {}).items()}
    return config, out


def read_adapter_config(directory):
    """The config in ``directory/adapter_config.json`` (a ``LoraConfig``, fastpeft's ``SparseDeltaConfig``,
    ``BitFitConfig``, ...); raises for other PEFT types and for LoRA variants fastpeft cannot compute
    (layer replication, ``fan_in_fan_out``, ...)."""
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
    method = METHODS.get(d.get("peft_type"))
    if method is None:
        raise ValueError(f"peft_type in {path} must be one of {list(METHODS)}, got {d.get('peft_type')!r}")
    return method.config_from_json(d, path)


def read_adapter_weights(directory, prefix: str = PREFIX) -> dict:
    """Key (without ``prefix``, PEFT's ``base_model.model.`` by default; a prompt-learning file's is
    ``base_model.``) -> tensor from ``directory/adapter_model.safetensors``."""
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
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in raw.items()}


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a Hugging Face Hub repo id: owner/name


def adapter_folder(source, revision: str | None = None, subfolder: str | None = None) -> str:
    """The local folder of an adapter: ``source`` itself (plus ``subfolder``) when it is a folder here, else a Hub
    repo id (``owner/name``) downloaded with ``huggingface_hub.snapshot_download`` (its cache; ``revision``), as
    PEFT's ``from_pretrained`` takes them. Raises FileNotFoundError naming both tries."""
    local = os.fspath(source)
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a str (a branch, tag or commit) or None, got {revision!r}")
    if subfolder is not None and (not isinstance(subfolder, str) or not subfolder):
        raise TypeError(f"subfolder must be a non-empty str or None, got {subfolder!r}")
    if os.path.isdir(local):
        return os.path.join(local, subfolder) if subfolder else local
    if not _REPO_ID.match(local):
        return local  # (read_adapter_config names the missing file)
    try:
        from huggingface_hub import snapshot_download
        patterns = [f"{subfolder}/*" if subfolder else "*"]
        root = snapshot_download(repo_id=local, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, no access: the user needs the reason
        raise FileNotFoundError(f"adapter {local!r} is no folder here, and downloading it from the Hugging Face Hub "
                                f"failed: {type(e).__name__}: {e}") from None
    return os.path.join(root, subfolder) if subfolder else root


def load_adapter(model: nn.Module, directory, adapter_name: str = "default", trainable: bool = True,
                 autocast_adapter_dtype: bool = True, revision: str | None = None,
                 subfolder: str | None = None, residual: bool = False) -> nn.Module:
    """Load a PEFT-format adapter from ``directory`` into ``model`` as ``adapter_name``; returns ``model``.
    ``directory``: a local folder, or a Hugging Face Hub repo id (``owner/name``; ``revision``, ``subfolder`` as in
    PEFT's ``from_pretrained``), downloaded to the Hub cache first (``adapter_folder``).

    - a model without adapters gets the adapter injected from the saved config; the adapter is active,
      and trains unless ``trainable=False``;
    - a model with other (LoRA) adapters gets this one beside them (ranks may differ), inactive and
      frozen (``fastpeft.set_adapter`` activates it; ``fastpeft.mixed_batch`` routes it per sequence);
    - a model that already has ``adapter_name`` gets its weights replaced and the saved alphas applied.
    The layers it makes take the mode of the module they sit in (an ``eval()`` model serves without dropout, as
    PEFT's ``from_pretrained`` gives). The config, every key and every shape are checked before the model changes.
    ``autocast_adapter_dtype`` as ``inject``'s (a new adapter on a bf16 / fp16 base gets fp32 factors, as PEFT's
    ``from_pretrained`` gives).

    A PiSSA / OLoRA file (``init_lora_weights`` "pissa" / "olora") onto a model without that adapter computes
    W - s B0 A0 from the model's W again, as PEFT's load does; ``residual=True`` says the model's weights are that
    residual already (saved after ``fastpeft.unload``, possibly quantized since: QPiSSA) and loads the adapter as plain
    LoRA on them (PEFT's example sets ``init_lora_weights=True`` in the file for this). A LoftQ file (``"loftq"``)
    likewise quantizes the model's W again (Q; bitsandbytes' quantizers are deterministic) onto a floating-point model,
    and loads as plain LoRA onto a model holding bitsandbytes layers (loaded in 4 / 8 bits: LoftQ's quantized base,
    PEFT's intended use, where PEFT's own load would quantize again) or with ``residual=True``.
    """
    check_adapter_name(adapter_name)
    check_bool(trainable, "trainable")
    check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
    sharded = [n for n, p in model.named_parameters() if _sharded(p)]
    if sharded:
        raise ValueError(f"load_adapter: the model's parameters {few(sharded)} are sharded DTensors (FSDP2 "
                         "fully_shard, tensor parallel): load adapters before sharding")
    check_bool(residual, "residual")
    directory = adapter_folder(directory, revision, subfolder)
    config = read_adapter_config(directory)
    init = getattr(config, "init_lora_weights", None)
    if init == "loftq" and adapter_name not in adapter_configs(model) and any(map(is_quantized, model.modules())):
        residual = True  # (a model in 4 / 8 bits: its weights are LoftQ's Q already)
    if residual:
        if base_rewriting_init(init) is None:
            raise ValueError(f"residual=True, but the adapter in {directory!r} was made with init_lora_weights="
                             f"{init!r}: only PiSSA / OLoRA / LoftQ / CorDA adapters ('pissa', 'pissa_niter_<n>', "
                             "'olora', 'loftq', 'corda') sit on a rewritten base; load this one without residual=True")
        config = with_init(config)
    method = method_for(config)
    weights = read_adapter_weights(directory, method.file_prefix)
    configs = adapter_configs(model)
    plan, weights = method.check_load(model, config, adapter_name, weights, directory, peft_state(model))
    meta = _meta_parameters(model, plan, peft_state(model))
    if meta:  # a copy into (or beside) a meta tensor keeps nothing
        raise ValueError(f"load_adapter: the parameters {few(meta)} the adapter goes on are on the meta device (a "
                         "model built under init_empty_weights): load the model's weights first (to_empty + "
                         "load_state_dict, or from_pretrained), then the adapter")
    if adapter_name in configs:
        state = peft_state(model)
        method.reload(model, config, adapter_name, plan, state)
        held = getattr(configs[adapter_name], "init_lora_weights", None)
        if held is not None and getattr(config, "init_lora_weights", None) != held:  # weights into the model's own
            config = with_init(config, configs[adapter_name])  # adapter: its init (what its base is) stays
        state.adapters[adapter_name] = config
    else:
        before = list(model.modules())  # (held: no module's id is reused by the new ones)
        with warnings.catch_warnings():  # (LoftQ's start is not this model's: the file's A and B replace it)
            warnings.filterwarnings("ignore", message=LOFTQ_SCALING_WARNING, category=UserWarning)
            inject(model, config, adapter_name, plan=plan, activate=not configs,
                   autocast_adapter_dtype=autocast_adapter_dtype)
        known = set(map(id, before))
        for name, module in model.named_modules():  # parents first: each new layer takes its parent's mode (an eval
            if id(module) not in known and name:    # model, or an eval part of one, serves without dropout)
                module.training = model.get_submodule(name.rpartition(".")[0]).training
    method.install(model, config, adapter_name, weights, trainable, peft_state(model))
    return model
