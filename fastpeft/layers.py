"""``FastLoRALinear``: an ``nn.Linear`` with trainable low-rank updates, one or many adapters.

Storage: all adapters of a layer live in two stacked tensors, A (n, r_max, in) and B (n, out, r_max),
zero beyond each adapter's rank. Each adapter's ``lora_A`` (r, in) / ``lora_B`` (out, r) Parameter is a
view into them, so an optimizer step on an adapter updates the stack in place and a mixed batch reads
the stack without copying. Adding or deleting adapters re-packs the stack and re-points the views (the
Parameter objects, and so optimizer state, stay the same); a stack that no longer backs the Parameters
(after ``.to()``, a deepcopy, or a user's ``p.data = ...``) is re-packed on next use. Parameters that
others swap in (FSDP2's ``fully_shard``) are never re-pointed: the layer then stacks copies, as it does
after ``unpack()``, which gives each adapter contiguous Parameters of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_dropout, check_finite_number, check_rank, check_sparse_delta, expand_adapter_ids
from .functional import lora_linear, lora_linear_multi, lora_sparse_linear, resolve_backend, sparse_delta_linear
from .reference import dense_delta_ref
from .selection import SELECTIONS, select_indices

INIT_CHOICES = (True, False, "gaussian")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_init(init_lora_weights):
    if not any(init_lora_weights is c or init_lora_weights == c for c in INIT_CHOICES) \
            or isinstance(init_lora_weights, (int, float)) and not isinstance(init_lora_weights, bool):
        raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}")
    return init_lora_weights


def check_adapter_name(name) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty str without '.', got {name!r}")
    return name


@dataclass
class AdapterSpec:
    """Hyper-parameters of one adapter of a layer."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    sparse_density: float = 0.0  # > 0: a sparse delta beside the low-rank update (RoSA)
    sparse_block_size: int = 1
    sparse_selection: str = "random"

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def check_sparse_options(density, block_size, selection, density_name="density", allow_zero=False) -> None:
    ok_density = isinstance(density, (int, float)) and not isinstance(density, bool) and \
        (0.0 <= float(density) <= 1.0 if allow_zero else 0.0 < float(density) <= 1.0)
    if not ok_density:
        raise ValueError(f"{density_name} must be a float in {'[0, 1]' if allow_zero else '(0, 1]'}, got {density!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


def _spec(r, lora_alpha, lora_dropout, use_rslora, sparse_density=0.0, sparse_block_size=1,
          sparse_selection="random") -> AdapterSpec:
    check_rank(r)
    alpha = check_finite_number(lora_alpha, "lora_alpha")
    if alpha == int(alpha):
        alpha = int(alpha)  # keep PEFT's JSON ints as ints
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
    check_sparse_options(sparse_density, sparse_block_size, sparse_selection, "sparse_density", allow_zero=True)
    return AdapterSpec(r, alpha, check_dropout(lora_dropout), use_rslora, float(sparse_density), sparse_block_size,
                       sparse_selection)


class _SparsePlanCache:
    """The tile bucketing of a delta's indices for the triton path, rebuilt when the indices change."""

    def __init__(self):
        self.key, self.plan = None, None

    def get(self, op: str, x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, block_size: int):
        # While torch.compile traces, the op builds the plan inside the graph (no host sync): the cache key
        # holds a data pointer, which dynamo cannot compare.
        if torch.compiler.is_compiling() or resolve_backend(op, None, x, weight) != "triton":
            return None
        key = (indices.data_ptr(), indices._version, tuple(indices.shape), x.device, tuple(weight.shape), block_size)
        if key != self.key:
            from .ops.sparse import build_sparse_plan

            self.plan = build_sparse_plan(indices, weight.shape[0], weight.shape[1], block_size, x.device)
            self.key = key
        return self.plan


def _values_shape(indices: torch.Tensor, block_size: int) -> tuple:
    return (indices.shape[0],) if block_size == 1 else (indices.shape[0], block_size, block_size)


class FastLoRALinear(nn.Module):
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with W (and b) frozen.

    Shapes: weight (out, in), bias (out,), lora_A (r, in), lora_B (out, r); x (..., in) -> (..., out).
    ``scaling = lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``). The adapter built with the
    layer is named ``"default"``; ``add_adapter`` adds more (other ranks too), ``set_adapter`` picks the
    one ``forward(x)`` uses and trains, and ``forward(x, adapter_ids)`` gives each row its own.
    ``r``, ``lora_alpha``, ``lora_dropout``, ``scaling``, ``lora_A`` and ``lora_B`` are the active
    adapter's.
    """

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True,
                 use_rslora=False, init_lora_weights=True, device=None, dtype=None, adapter_name="default",
                 sparse_density=0.0, sparse_block_size=1, sparse_selection="random"):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            check_rank(v, name)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora,
                    init_lora_weights, sparse_density, sparse_block_size, sparse_selection)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True, adapter_name="default", sparse_density=0.0, sparse_block_size=1,
                    sparse_selection="random") -> "FastLoRALinear":
        """Wrap ``linear``: the new layer shares (not copies) its weight and bias, and freezes them."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora,
                    init_lora_weights, sparse_density, sparse_block_size, sparse_selection)
        return self

    def _setup(self, weight, bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
               sparse_density=0.0, sparse_block_size=1, sparse_selection="random"):
        spec = _spec(r, lora_alpha, lora_dropout, use_rslora, sparse_density, sparse_block_size, sparse_selection)
        _check_init(init_lora_weights)
        check_adapter_name(adapter_name)
        self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        self.lora_A_adapters = nn.ParameterDict()
        self.lora_B_adapters = nn.ParameterDict()
        self.sparse_values = nn.ParameterDict()  # adapter -> delta values (RoSA adapters only)
        self._sparse_plans: dict = {}            # adapter -> _SparsePlanCache
        self._specs: dict = {}
        self._active: str | None = None
        self._stack = None      # (A (n, r_max, in), B (n, out, r_max)) backing the adapter Parameters
        self._stack_params = None  # the Parameter objects the stacks were packed for
        self._packed = True     # False after unpack(): each adapter keeps Parameters of its own
        self._meta = None       # device tensors (scalings, ranks, dropout) for mixed batches
        self._routing = None    # per-sequence ids set by fastpeft.mixed_batch
        self.merged = False
        self.add_adapter(adapter_name, spec.r, spec.lora_alpha, spec.lora_dropout, spec.use_rslora,
                         init_lora_weights, spec.sparse_density, spec.sparse_block_size, spec.sparse_selection)
        self.set_adapter(adapter_name)

    # ---- the adapter registry ------------------------------------------------------------------

    @property
    def adapter_names(self) -> list:
        """Names of the layer's adapters; a name's index is its adapter id in ``forward(x, adapter_ids)``."""
        return list(self._specs)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                    sparse_density=0.0, sparse_block_size=1, sparse_selection="random", sparse_scores=None):
        """Add adapter ``name`` (its own rank, alpha, dropout); the active adapter does not change and the
        new one starts frozen unless it is the first (``set_adapter`` trains the active one).
        ``sparse_density > 0`` adds a sparse delta beside the low-rank update (RoSA): that share of W's
        entries (or blocks of ``sparse_block_size``), picked by ``sparse_selection``, zero at first."""
        check_adapter_name(name)
        if name in self._specs:
            raise ValueError(f"adapter {name!r} already exists in this layer (adapters {self.adapter_names})")
        spec = _spec(r, lora_alpha, lora_dropout, use_rslora, sparse_density, sparse_block_size, sparse_selection)
        _check_init(init_lora_weights)
        # The positions first: select_indices checks sparse_scores, and a failure must leave the layer as it was.
        idx = (select_indices(self.weight, spec.sparse_density, spec.sparse_block_size, spec.sparse_selection,
                              sparse_scores) if spec.sparse_density > 0.0 else None)
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A_adapters[name] = nn.Parameter(torch.empty(spec.r, self.in_features, **kw),
                                                  requires_grad=self._active is None)
        self.lora_B_adapters[name] = nn.Parameter(torch.empty(self.out_features, spec.r, **kw),
                                                  requires_grad=self._active is None)
        self._specs[name] = spec
        if idx is not None:
            self.register_buffer(f"sparse_indices_{name}", idx)
            self.sparse_values[name] = nn.Parameter(
                torch.zeros(_values_shape(idx, spec.sparse_block_size), **kw), requires_grad=self._active is None)
            self._sparse_plans[name] = _SparsePlanCache()
        self.reset_lora_parameters(init_lora_weights, adapter_name=name)
        self._repack()

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter ``forward(x)`` applies and the only one that trains (None: none)."""
        if name is not None and name not in self._specs:
            raise ValueError(f"adapter {name!r} is not in this layer; it has {self.adapter_names}")
        if self.merged and name != self._active:
            raise RuntimeError(f"set_adapter({name!r}) on a layer with {self._active!r} merged: unmerge() first")
        self._active = name
        for n in self._specs:
            self.lora_A_adapters[n].requires_grad_(n == name)
            self.lora_B_adapters[n].requires_grad_(n == name)
            if n in self.sparse_values:
                self.sparse_values[n].requires_grad_(n == name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; later adapters' ids shift down by one. Deleting the active adapter
        leaves none active (forward is then the base layer) until ``set_adapter``."""
        if name not in self._specs:
            raise ValueError(f"adapter {name!r} is not in this layer; it has {self.adapter_names}")
        if self.merged and name == self._active:
            raise RuntimeError(f"delete_adapter({name!r}): it is merged; unmerge() first")
        del self._specs[name]
        del self.lora_A_adapters[name]
        del self.lora_B_adapters[name]
        if name in self.sparse_values:
            del self.sparse_values[name]
            delattr(self, f"sparse_indices_{name}")
            del self._sparse_plans[name]
        if self._active == name:
            self._active = None
        self._repack()

    def _spec_of(self, name: str | None) -> AdapterSpec:
        name = self._active if name is None else name
        if name is None:
            raise AttributeError("this layer has no active adapter (set_adapter(name) picks one)")
        if name not in self._specs:
            raise ValueError(f"adapter {name!r} is not in this layer; it has {self.adapter_names}")
        return self._specs[name]

    def adapter_spec(self, name: str | None = None) -> AdapterSpec:
        """Rank, alpha, dropout and rsLoRA flag of adapter ``name`` (default: the active one)."""
        return self._spec_of(name)

    def adapter_parameters(self, name: str | None = None) -> tuple:
        """``(lora_A, lora_B)`` Parameters of adapter ``name`` (default: the active one)."""
        name = self._active if name is None else name
        self._spec_of(name)
        return self.lora_A_adapters[name], self.lora_B_adapters[name]

    def adapter_sparse_delta(self, name: str | None = None):
        """``(indices, values)`` of adapter ``name``'s sparse delta (RoSA), or None when it has none."""
        name = self._active if name is None else name
        self._spec_of(name)
        if name not in self.sparse_values:
            return None
        return getattr(self, f"sparse_indices_{name}"), self.sparse_values[name]

    @torch.no_grad()
    def set_sparse_delta(self, name: str, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Replace adapter ``name``'s sparse-delta positions (values: given, or zeros). Checked first."""
        spec = self._spec_of(name)
        if name not in self.sparse_values:
            raise ValueError(f"adapter {name!r} has no sparse delta (it was made with sparse_density=0)")
        _set_delta(self, self.sparse_values[name], f"sparse_indices_{name}", indices, values,
                   spec.sparse_block_size)

    def update_adapter(self, name: str, lora_alpha=None, lora_dropout=None, use_rslora=None) -> None:
        """Change an adapter's alpha / dropout / rsLoRA flag (its rank is fixed by its tensors)."""
        s = self._spec_of(name)
        new = _spec(s.r, s.lora_alpha if lora_alpha is None else lora_alpha,
                    s.lora_dropout if lora_dropout is None else lora_dropout,
                    s.use_rslora if use_rslora is None else use_rslora,
                    s.sparse_density, s.sparse_block_size, s.sparse_selection)
        if self.merged and name == self._active and new.scaling != s.scaling:
            raise RuntimeError("update_adapter would change the scaling of the merged adapter: unmerge() first")
        self._specs[name] = new
        self._meta = None

    # The active adapter's attributes, as in the single-adapter API.
    lora_A = property(lambda self: self.adapter_parameters()[0], doc="Active adapter's A (r, in).")
    lora_B = property(lambda self: self.adapter_parameters()[1], doc="Active adapter's B (out, r).")
    r = property(lambda self: self._spec_of(None).r)
    scaling = property(lambda self: self._spec_of(None).scaling)
    lora_alpha = property(lambda self: self._spec_of(None).lora_alpha,
                          lambda self, v: self.update_adapter(self._active, lora_alpha=v))
    lora_dropout = property(lambda self: self._spec_of(None).lora_dropout,
                            lambda self, v: self.update_adapter(self._active, lora_dropout=v))
    use_rslora = property(lambda self: self._spec_of(None).use_rslora,
                          lambda self, v: self.update_adapter(self._active, use_rslora=v))

    # ---- stacked storage -----------------------------------------------------------------------

    def _repack(self) -> None:
        """Copy every adapter into fresh stacks (n, r_max, in) / (n, out, r_max), zero-padded, and make
        each adapter's Parameters views into them."""
        names = self.adapter_names
        self._meta = None
        if not names or not self._packed:
            self._stack = None
            return
        a0 = self.lora_A_adapters[names[0]]
        r_max = max(s.r for s in self._specs.values())
        kw = dict(device=a0.device, dtype=a0.dtype)
        stack_a = torch.zeros(len(names), r_max, self.in_features, **kw)
        stack_b = torch.zeros(len(names), self.out_features, r_max, **kw)
        with torch.no_grad():
            for i, n in enumerate(names):
                r = self._specs[n].r
                pa, pb = self.lora_A_adapters[n], self.lora_B_adapters[n]
                stack_a[i, :r].copy_(pa)
                stack_b[i, :, :r].copy_(pb)
                pa.data = stack_a[i, :r]
                pb.data = stack_b[i, :, :r]
        self._stack = (stack_a, stack_b)
        self._stack_params = self._parameter_objects()

    def stacked(self) -> tuple:
        """``(A (n, r_max, in), B (n, out, r_max))`` backing the adapters (re-packed if it no longer does).

        After ``unpack()``, or once other Parameter objects were swapped in (FSDP2's ``fully_shard`` swaps
        in its own at every forward), a zero-padded copy instead: re-pointing Parameters that someone else
        fills would leave them stale."""
        if self._packed and self._stack_params is not None and not self._owns_parameters():
            self.unpack()
        if not self._packed:
            if not self._specs:
                return None
            r_max = max(s.r for s in self._specs.values())
            specs = self._specs.items()
            with torch.no_grad():
                return (torch.stack([F.pad(self.lora_A_adapters[n], (0, 0, 0, r_max - s.r)) for n, s in specs]),
                        torch.stack([F.pad(self.lora_B_adapters[n], (0, r_max - s.r)) for n, s in specs]))
        if self._stack is None or not self._stack_backs_parameters():
            self._repack()
        return self._stack

    def _parameter_objects(self) -> tuple:
        return tuple(p for n in self._specs for p in (self.lora_A_adapters[n], self.lora_B_adapters[n]))

    def _owns_parameters(self) -> bool:
        """Whether the adapters' Parameters are still the objects the stacks were packed for."""
        ps = self._parameter_objects()
        return len(ps) == len(self._stack_params) and all(p is q for p, q in zip(ps, self._stack_params))

    def unpack(self) -> None:
        """Give every adapter contiguous Parameters of its own instead of views into the shared stacks, and
        keep it so: mixed batches then stack a copy on each call. The Parameter objects (and so optimizer
        state) stay the same. Needed before FSDP2's ``fully_shard`` when a layer holds adapters of
        different ranks: their views are not contiguous, and fully_shard refuses those."""
        if self._packed and self._stack_params is not None and self._owns_parameters():
            with torch.no_grad():
                for p in self._stack_params:
                    p.data = p.data.clone(memory_format=torch.contiguous_format)
        self._packed = False
        self._stack = self._stack_params = None

    def _stack_backs_parameters(self) -> bool:
        stack_a, stack_b = self._stack
        names = self.adapter_names
        if stack_a.shape[0] != len(names):
            return False
        for i, n in enumerate(names):
            pa, pb = self.lora_A_adapters[n], self.lora_B_adapters[n]
            if pa.data_ptr() != stack_a[i].data_ptr() or pb.data_ptr() != stack_b[i].data_ptr() \
                    or pa.dtype != stack_a.dtype or pa.device != stack_a.device:
                return False
        return True

    def _adapter_meta(self, device) -> tuple:
        """(scalings fp32, ranks int64, dropout fp32) tensors (n,) on ``device``, cached."""
        if self._meta is None or self._meta[0].device != device:
            specs = list(self._specs.values())
            self._meta = (torch.tensor([s.scaling for s in specs], dtype=torch.float32, device=device),
                          torch.tensor([s.r for s in specs], dtype=torch.int64, device=device),
                          torch.tensor([s.lora_dropout for s in specs], dtype=torch.float32, device=device))
        return self._meta

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._stack = None  # .to() / .cuda() / .half() moved each Parameter on its own: re-pack lazily
        self._meta = None
        return out

    # ---- init, forward ---------------------------------------------------------------------------

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True, adapter_name: str | None = None) -> None:
        """PEFT's inits: ``True`` A kaiming-uniform(a=sqrt(5)), B zeros, so the layer starts as its base;
        ``"gaussian"`` A ~ N(0, std=1/r), B zeros; ``False`` both kaiming-uniform (non-zero B, for tests)."""
        _check_init(init_lora_weights)
        name = self._active if adapter_name is None else adapter_name
        spec = self._spec_of(name)
        if self.merged and name == self._active:
            raise RuntimeError("reset_lora_parameters on a merged adapter: call unmerge() first")
        a, b = self.lora_A_adapters[name], self.lora_B_adapters[name]
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r}, alpha={s.lora_alpha}, dropout={s.lora_dropout}, scaling={s.scaling:g})"
                             for n, s in self._specs.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"active={self._active!r}, merged={self.merged}, adapters=[{adapters}]")

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., in) -> (..., out). ``adapter_ids`` (int tensor of shape ``x.shape[:-1]`` per row, or
        ``(x.shape[0],)`` per sequence) gives each row the adapter of that index in ``adapter_names``
        (-1 = base only); inside ``fastpeft.mixed_batch`` the per-sequence routing applies."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = x.shape[-1] if x.dim() else "a 0-d tensor"
            raise ValueError(f"input's last dim must be in_features={self.in_features}, got {got}")
        check_ids = True
        if adapter_ids is None and self._routing is not None:
            adapter_ids, check_ids = self._routing, False
        if self.merged:
            if adapter_ids is not None:
                raise RuntimeError("adapter_ids cannot route rows on a merged layer: call unmerge() first")
            return F.linear(x, self.weight, self.bias)
        if adapter_ids is None:
            if self._active is None:
                return F.linear(x, self.weight, self.bias)
            s = self._specs[self._active]
            a, b = self.adapter_parameters()
            sparse = self.adapter_sparse_delta()
            if sparse is None:
                return lora_linear(x, self.weight, self.bias, a, b, s.scaling, s.lora_dropout, self.training)
            plan = self._sparse_plans[self._active].get("lora_sparse_linear", x, self.weight, sparse[0],
                                                        s.sparse_block_size)
            return lora_sparse_linear(x, self.weight, self.bias, a, b, s.scaling, sparse[0], sparse[1],
                                      s.sparse_block_size, s.lora_dropout, self.training, check=False, plan=plan)
        if len(self.sparse_values):
            raise RuntimeError("adapters with a sparse delta (RoSA) cannot be routed per row (adapter_ids / "
                               "mixed_batch); use set_adapter")
        if adapter_ids is self._routing and (x.dim() < 2 or x.shape[0] != adapter_ids.shape[0]):
            raise ValueError(f"mixed_batch was given {adapter_ids.shape[0]} adapter_names (one per sequence), but "
                             f"this layer's input has batch size {x.shape[0] if x.dim() >= 2 else 'none'} "
                             f"(shape {tuple(x.shape)})")
        ids = expand_adapter_ids(adapter_ids, x, len(self._specs), check_range=check_ids)
        if not self._specs:
            return F.linear(x, self.weight, self.bias)
        scalings, ranks, dropout = self._adapter_meta(x.device)
        stack_a, stack_b = self._differentiable_stacks()
        return lora_linear_multi(x, self.weight, self.bias, stack_a, stack_b, scalings, ids, ranks,
                                 dropout_p=dropout, training=self.training, check_ids=False)

    def _differentiable_stacks(self) -> tuple:
        """The stacks, read in place; when an adapter trains, built from its Parameters instead so that
        gradients reach them (zero-padded to r_max). Always built while torch.compile traces: whether the
        stacks still back the Parameters is a data-pointer test, which dynamo cannot trace."""
        if not torch.compiler.is_compiling():
            stack_a, stack_b = self.stacked()
            if not torch.is_grad_enabled() or not any(p.requires_grad for p in self.lora_A_adapters.values()) \
                    and not any(p.requires_grad for p in self.lora_B_adapters.values()):
                return stack_a, stack_b
        r_max = max(s.r for s in self._specs.values())
        pa = [F.pad(self.lora_A_adapters[n], (0, 0, 0, r_max - s.r)) for n, s in self._specs.items()]
        pb = [F.pad(self.lora_B_adapters[n], (0, r_max - s.r)) for n, s in self._specs.items()]
        return torch.stack(pa), torch.stack(pb)

    # ---- merging ---------------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``scaling * B A`` (+ the sparse delta, RoSA) (out, in) of an adapter (default: the active one), in
        the weight's dtype, computed in fp32."""
        name = self._active if adapter_name is None else adapter_name
        s = self._spec_of(name)
        a, b = self.lora_A_adapters[name], self.lora_B_adapters[name]
        delta = s.scaling * (b.float() @ a.float())
        sparse = self.adapter_sparse_delta(name)
        if sparse is not None:
            delta += dense_delta_ref(sparse[0], sparse[1].float(), self.out_features, self.in_features,
                                     s.sparse_block_size)
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the weight in place (W += scaling B A); forward is then a plain
        linear. The weight's storage is shared with the wrapped ``nn.Linear``, which sees the change too."""
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged")
        self._spec_of(None)
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
        """A new ``nn.Linear`` holding W + scaling B A of the active adapter (and a copy of b); this
        layer is left untouched."""
        w = self.weight.detach().clone()
        if not self.merged and self._active is not None:
            w += self.delta_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin


@torch.no_grad()
def _set_delta(module: nn.Module, values_param: nn.Parameter, buffer_name: str, indices: torch.Tensor,
               values: torch.Tensor | None, block_size: int) -> None:
    """Check then install new delta positions (and values, else zeros) in place of the old ones."""
    weight = module.weight
    check_sparse_delta(indices, values if values is not None else
                       weight.new_zeros(_values_shape(indices, block_size)), weight.shape[0], weight.shape[1],
                       block_size)
    idx = indices.to(device=weight.device, dtype=torch.int64)
    new_values = (values.to(device=weight.device, dtype=values_param.dtype).clone() if values is not None
                  else torch.zeros(_values_shape(idx, block_size), device=weight.device, dtype=values_param.dtype))
    setattr(module, buffer_name, idx)
    values_param.data = new_values


class SparseDeltaLinear(nn.Module):
    """``y = x (W + Δ)^T + b``: W (and b) frozen, Δ a trainable sparse delta on a few of W's entries.

    Shapes: weight (out, in); block_size 1: delta_indices (nnz,) flat row-major indices into W (a
    buffer) and delta_values (nnz,); block_size b: delta_indices (nblocks, 2) block (row, col) and
    delta_values (nblocks, b, b). nnz (or nblocks) = round(density x entries (or blocks)). Δ starts at
    zero, so the layer starts as its base. ``selection``: "random", "magnitude" (largest |W|) or
    "scores" (largest |scores|, e.g. gradient magnitudes from ``fastpeft.select_by_gradients``).
    """

    def __init__(self, in_features, out_features, density=0.01, block_size=1, selection="random", bias=True,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            check_rank(v, name)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, density, block_size, selection, None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, density=0.01, block_size=1, selection="random", scores=None):
        """Wrap ``linear``: shares (not copies) its weight and bias, and freezes them."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, density, block_size, selection, scores)
        return self

    def _setup(self, weight, bias, density, block_size, selection, scores):
        check_sparse_options(density, block_size, selection)
        self.out_features, self.in_features = weight.shape
        self.density, self.block_size, self.selection = float(density), block_size, selection
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        idx = select_indices(weight, density, block_size, selection, scores)
        self.register_buffer("delta_indices", idx)
        self.delta_values = nn.Parameter(torch.zeros(_values_shape(idx, block_size), device=weight.device,
                                                     dtype=weight.dtype))
        self.merged = False
        self._plan = _SparsePlanCache()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density}, block_size={self.block_size}, selection={self.selection!r}, "
                f"entries={self.delta_values.numel()}, merged={self.merged}")

    @torch.no_grad()
    def set_delta(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Replace the delta's positions (and values: given, or zeros), checked first. The values
        Parameter stays the same object (its optimizer state must be reset if its size changed)."""
        if self.merged:
            raise RuntimeError("set_delta on a merged layer: call unmerge() first")
        _set_delta(self, self.delta_values, "delta_indices", indices, values, self.block_size)

    def reselect(self, selection: str | None = None, scores: torch.Tensor | None = None) -> None:
        """Pick new positions (``selection``, default the layer's) and reset the values to zero."""
        selection = selection or self.selection
        check_sparse_options(self.density, self.block_size, selection)
        self.selection = selection
        self.set_delta(select_indices(self.weight, self.density, self.block_size, selection, scores))

    def dense_delta(self) -> torch.Tensor:
        """Δ as a dense (out, in) tensor (differentiable in delta_values)."""
        return dense_delta_ref(self.delta_indices, self.delta_values, self.out_features, self.in_features,
                               self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = x.shape[-1] if x.dim() else "a 0-d tensor"
            raise ValueError(f"input's last dim must be in_features={self.in_features}, got {got}")
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        plan = self._plan.get("sparse_delta_linear", x, self.weight, self.delta_indices, self.block_size)
        return sparse_delta_linear(x, self.weight, self.bias, self.delta_indices, self.delta_values, self.block_size,
                                   check=False, plan=plan)

    @torch.no_grad()
    def merge(self) -> None:
        """W += Δ in place (the weight's storage is shared with the wrapped nn.Linear)."""
        if self.merged:
            raise RuntimeError("merge: the delta is already merged")
        self.weight.add_(self.dense_delta().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W -= Δ)."""
        if not self.merged:
            raise RuntimeError("unmerge: the delta is not merged")
        self.weight.sub_(self.dense_delta().to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new nn.Linear holding W + Δ (and a copy of b); this layer is left untouched."""
        w = self.weight.detach().clone()
        if not self.merged:
            w += self.dense_delta().to(w.dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin
