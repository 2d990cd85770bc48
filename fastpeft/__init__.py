"""fastpeft: parameter-efficient fine-tuning for PyTorch, with fused Triton kernels on its hot paths.

The public API (see the README's API table): ``lora_linear``, ``lora_linear_multi``, ``FastLoRALinear``,
``LoraConfig``, ``dora_linear``, ``inject``, ``set_adapter``, ``delete_adapter``, ``mixed_batch``, ``disable_adapter``,
``add_weighted_adapter``, ``trainable_parameters``, ``save_adapter``, ``load_adapter``, ``merge_and_unload``,
``unload``, ``replace_lora_weights_loftq``, ``use_backend``; ``set_deterministic`` / ``deterministic()`` for bitwise
reproducible runs; ``accelerate`` / ``restore`` for existing PEFT models.
"""
from .accelerate import AccelerateReport, accelerate, restore
from .hf import to_peft
from .functional import (BACKENDS, current_backend, dora_linear, lora_linear, lora_linear_multi, lora_sparse_linear,
                         sparse_delta_linear, use_backend)
from .inject import (LoraConfig, SparseDeltaConfig, active_adapter, add_weighted_adapter, delete_adapter,
                     disable_adapter, format_trainable_parameters, inject, lora_layers, merge_and_unload, mixed_batch,
                     print_trainable_parameters, select_by_gradients, set_adapter, sparse_layers, trainable_parameters,
                     unload)
from .inject import replace_lora_weights_loftq  # LoftQ's adapters on a model loaded in 4 / 8 bits (PEFT's function)
from .inject import get_eva_state_dict, initialize_lora_eva_weights  # EVA's data-driven init (PEFT's functions)
from .inject import preprocess_corda  # CorDA's input covariance for init_lora_weights="corda" (PEFT's function)
from .io import load_adapter, read_adapter_config, save_adapter
from .kernels import deterministic, is_deterministic, set_deterministic
from .layers import FastLoRALinear, ModulesToSaveWrapper, SparseDeltaLinear, TrainableTokensWrapper
from .functional import dora_conv, lora_conv  # LoRA / DoRA on nn.Conv1d / Conv2d / Conv3d (PEFT's lora.Conv*d)
from .functional import lora_experts  # LoRA on a mixture of experts' 3-D expert weights (target_parameters)
from .functional import qlora_linear  # QLoRA: LoRA over a bitsandbytes 4-bit / 8-bit base
from .layers import FastLoRAConv, FastLoRAEmbedding, FastLoRAParameter, QLoRALinear
from .methods import (AdapterConfig, BitFitConfig, BottleneckAdapter, LayerwiseConfig, PromptTuningConfig,
                      layerwise_param_groups)
from .reference import (dense_delta_ref, dora_linear_ref, lora_conv_ref, lora_grouped_linear_ref, lora_linear_multi_ref,
                        lora_linear_ref, lora_sparse_linear_ref, sparse_delta_linear_ref)
from .selection import select_indices

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "FastLoRALinear", "LoraConfig", "ModulesToSaveWrapper", "active_adapter", "current_backend",
    "delete_adapter", "format_trainable_parameters", "inject", "load_adapter", "lora_layers", "lora_linear",
    "lora_linear_multi", "lora_linear_multi_ref", "lora_linear_ref", "merge_and_unload", "unload", "mixed_batch",
    "print_trainable_parameters", "read_adapter_config", "save_adapter", "set_adapter", "trainable_parameters",
    "use_backend", "SparseDeltaConfig", "SparseDeltaLinear", "dense_delta_ref", "lora_sparse_linear",
    "lora_sparse_linear_ref", "select_by_gradients", "select_indices", "sparse_delta_linear",
    "sparse_delta_linear_ref", "sparse_layers", "AdapterConfig", "BitFitConfig", "BottleneckAdapter",
    "LayerwiseConfig", "PromptTuningConfig", "layerwise_param_groups", "deterministic", "is_deterministic",
    "set_deterministic", "AccelerateReport", "accelerate", "restore", "to_peft", "dora_linear", "dora_linear_ref",
]
__all__ += ["qlora_linear", "QLoRALinear", "FastLoRAEmbedding", "TrainableTokensWrapper", "disable_adapter",
            "add_weighted_adapter", "lora_experts", "lora_grouped_linear_ref", "lora_conv", "lora_conv_ref",
            "FastLoRAConv", "dora_conv", "FastLoRAParameter", "replace_lora_weights_loftq",
            "get_eva_state_dict", "initialize_lora_eva_weights", "preprocess_corda"]
