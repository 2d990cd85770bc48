"""``FastLoRALinear``: an ``nn.Linear`` with a trainable low-rank update, computed by ``lora_linear``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_dropout, check_finite_number, check_rank
from .functional import draw_seed, lora_linear
from .reference import lora_dropout_ref

INIT_CHOICES = (True, False, "gaussian")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_init(init_lora_weights):
    if not any(init_lora_weights is c or init_lora_weights == c for c in INIT_CHOICES) \
            or isinstance(init_lora_weights, (int, float)) and not isinstance(init_lora_weights, bool):
        raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}")
    return init_lora_weights


class FastLoRALinear(nn.Module):
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with W (and b) frozen.

    Shapes: weight (out, in), bias (out,), lora_A (r, in), lora_B (out, r); x (..., in) -> (..., out).
    ``scaling = lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``). The adapter built with the
    layer is named ``"default"`` (``adapter_names``). Only ``lora_A`` and ``lora_B`` require grad.
    """

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True,
                 use_rslora=False, init_lora_weights=True, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            check_rank(v, name)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True) -> "FastLoRALinear":
        """Wrap ``linear``: the new layer shares (not copies) its weight and bias, and freezes them."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        return self

    def _setup(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights):
        self.r = check_rank(r)
        self.lora_alpha = check_finite_number(lora_alpha, "lora_alpha")
        if self.lora_alpha == int(self.lora_alpha):
            self.lora_alpha = int(self.lora_alpha)  # keep PEFT's JSON ints as ints
        self.lora_dropout = check_dropout(lora_dropout)
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(self.r, self.lora_alpha, use_rslora)
        self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **kw))
        self.merged = False
        self.adapter_names = ["default"]
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True) -> None:
        """PEFT's inits: ``True`` A kaiming-uniform(a=sqrt(5)), B zeros, so the layer starts as its base;
        ``"gaussian"`` A ~ N(0, std=1/r), B zeros; ``False`` both kaiming-uniform (non-zero B, for tests)."""
        _check_init(init_lora_weights)
        if self.merged:
            raise RuntimeError("reset_lora_parameters on a merged layer: call unmerge() first")
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, scaling={self.scaling:g}, merged={self.merged}")

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., in) -> (..., out). ``adapter_ids`` (LongTensor of shape ``x.shape[:-1]`` per row, or
        ``(x.shape[0],)`` per sequence) picks each row's adapter: 0 = ``"default"``, -1 = base only."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = x.shape[-1] if x.dim() else "a 0-d tensor"
            raise ValueError(f"input's last dim must be in_features={self.in_features}, got {got}")
        if self.merged:
            if adapter_ids is not None:
                raise RuntimeError("adapter_ids cannot route rows on a merged layer: call unmerge() first")
            return F.linear(x, self.weight, self.bias)
        if adapter_ids is None:
            return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                               self.lora_dropout, self.training)
        # One adapter per layer for now: rows with id 0 get it, rows with -1 the base only. The LoRA
        # branch is linear in its input, so zeroing the shrunk rows u = drop(x) A^T routes it.
        keep = self._rows_with_adapter(x, adapter_ids)
        p = self.lora_dropout if self.training else 0.0
        xd = lora_dropout_ref(x, p, draw_seed()) if p > 0.0 else x
        u = F.linear(xd, self.lora_A) * keep.to(x.dtype).unsqueeze(-1)
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(u, self.lora_B)

    def _rows_with_adapter(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of x.shape[:-1]: rows whose id is 0; checks ids' dtype, shape and range."""
        if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"adapter_ids must be an int64/int32 tensor, got "
                            f"{getattr(adapter_ids, 'dtype', type(adapter_ids).__name__)}")
        if adapter_ids.device != x.device:
            raise ValueError(f"adapter_ids must be on x's device {x.device}, got {adapter_ids.device}")
        rows = x.shape[:-1]
        if tuple(adapter_ids.shape) == tuple(rows):
            ids = adapter_ids
        elif x.dim() >= 2 and tuple(adapter_ids.shape) == (x.shape[0],):
            ids = adapter_ids.view((-1,) + (1,) * (x.dim() - 2)).expand(rows)
        else:
            raise ValueError(f"adapter_ids must have shape {tuple(rows)} (per row) or ({x.shape[0]},) "
                             f"(per sequence), got {tuple(adapter_ids.shape)}")
        n = len(self.adapter_names)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n):
            raise ValueError(f"adapter_ids must be in [-1, {n - 1}] (-1 = base only; adapters "
                             f"{self.adapter_names}), got values in [{int(ids.min())}, {int(ids.max())}]")
        return ids >= 0

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` (out, in) in the weight's dtype, computed in fp32."""
        return (self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight in place (W += scaling B A); forward is then a plain linear.
        The weight's storage is shared with the wrapped ``nn.Linear``, which sees the change too."""
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged")
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W -= scaling B A). Exact up to the weight dtype's rounding."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        self.weight.sub_(self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding W + scaling B A (and a copy of b); this layer is left untouched."""
        w = self.weight.detach().clone()
        if not self.merged:
            w += self.delta_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin
