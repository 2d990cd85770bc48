"""fastpeft: parameter-efficient fine-tuning for PyTorch, with fused Triton kernels on its hot paths.

The public API (see API.md): ``lora_linear``, ``lora_linear_multi``, ``FastLoRALinear``, ``LoraConfig``,
``inject``, ``set_adapter``, ``delete_adapter``, ``mixed_batch``, ``trainable_parameters``,
``save_adapter``, ``load_adapter``, ``merge_and_unload``, ``use_backend``.
"""
from .functional import BACKENDS, current_backend, lora_linear, lora_linear_multi, use_backend
from .inject import (LoraConfig, ModulesToSaveWrapper, active_adapter, delete_adapter, format_trainable_parameters,
                     inject, lora_layers, merge_and_unload, mixed_batch, print_trainable_parameters, set_adapter,
                     trainable_parameters)
from .io import load_adapter, read_adapter_config, save_adapter
from .layers import FastLoRALinear
from .reference import lora_linear_multi_ref, lora_linear_ref

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "FastLoRALinear", "LoraConfig", "ModulesToSaveWrapper", "active_adapter", "current_backend",
    "delete_adapter", "format_trainable_parameters", "inject", "load_adapter", "lora_layers", "lora_linear",
    "lora_linear_multi", "lora_linear_multi_ref", "lora_linear_ref", "merge_and_unload", "mixed_batch",
    "print_trainable_parameters", "read_adapter_config", "save_adapter", "set_adapter", "trainable_parameters",
    "use_backend",
]
