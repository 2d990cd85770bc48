"""What the op families share: the dropout seed, autocast casting, the frozen base layer's gradients and
the shape keys under which the timed GEMM choices are cached."""
from __future__ import annotations

import contextlib
import operator

import torch

from ..reference import tracing_or_transformed


# torch 2.11 (pytorch/pytorch#180642, a silent-correctness bug): while torch.compile traces an autograd.Function
# whose forward returns a tensor it changed in place (y.addmm_ of the rank-r update, a kernel writing into y), dynamo
# also records the tensor's pre-mutation alias as an output, and autograd routes the backward to it: the compiled
# gradients come out zero. Returning a clone while tracing avoids it; inductor drops the clone as a no-op. Checked
# with a 5-line repro: 2.11.0 has it; 2.12.0, 2.12.1 and 2.13.0 do not.
_CLONE_RETURNED = tuple(int(v) for v in torch.__version__.split(".")[:2]) == (2, 11)


def returned(y: torch.Tensor) -> torch.Tensor:
    """``y`` as an autograd.Function's forward returns it: a clone while torch.compile traces on the torch
    versions with the in-place-output bug above, else ``y`` itself."""
    return y.clone() if _CLONE_RETURNED and torch.compiler.is_compiling() else y


def recorded_grads(out: torch.Tensor, inputs: tuple, needs, dy: torch.Tensor, extra: int) -> tuple:
    """An autograd.Function's gradients under ``create_graph`` (second derivatives): autograd through ``out``, the
    forward's formula recomputed by recorded ops from the saved ``inputs`` (the same dropout mask), so that the
    gradients carry how they depend on the inputs; the fast backward's saved products (u, g) carry no graph, and
    through them second derivatives would be silently wrong. ``needs``: ``ctx.needs_input_grad`` of ``inputs``;
    ``extra`` Nones follow, for the other arguments. Double backward only: the recomputation forms full products."""
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    grads = iter(torch.autograd.grad(out, wanted, dy.to(out.dtype), create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(inputs, needs)) + (None,) * extra


def no_second_derivatives(what: str) -> None:
    """Refuse ``create_graph`` in the backward of ``what``, a triton Function whose gradients carry no graph: a
    double backward through them would miss their part (silently, beside other ops) instead of failing."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"create_graph=True (second derivatives) through {what} on the triton kernels: their "
                           "gradients carry no graph. Run it on the PyTorch path, whose gradients are differentiable: "
                           "backend='reference', or `with fastpeft.use_backend('reference'):`")


# Optimizer steps counted by torch.optim's global post-step hook (registered at the first ``optimizer_steps()`` call):
# fused AdamW (Trainer's default ``adamw_torch_fused``) and bitsandbytes' optimizers update Parameters in place without
# bumping their version counters, so every cache of values derived from trainable Parameters (the mixed-batch stacks,
# DoRA's norm and m / n, QLoRA's casts of the adapters) keys on this count beside the versions.
_OPTIMIZER_STEPS = [0]
_STEP_HOOK: list = []


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


def optimizer_steps() -> int:
    """How many optimizer steps (any ``torch.optim.Optimizer`` subclass: torch's, bitsandbytes', ...) have run since
    the first call of this function: a cache key, so that a step invalidates what was derived from the weights
    even where it does not bump their version counters."""
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_step))
    return _OPTIMIZER_STEPS[0]


def tensor_version(t: torch.Tensor):
    """``t._version``, or for an inference tensor (made in ``torch.inference_mode``: it has no version counter, and
    can be written in place there unseen) a new object, which no later key equals: a value kept on it is
    recomputed at every call."""
    try:
        return t._version
    except RuntimeError:
        return object()


def kept_state(tensors) -> tuple:
    """The key of a value derived from ``tensors`` and kept between no-grad calls: each tensor's version, storage,
    dtype, device and shape (None for None), and ``optimizer_steps()`` (fused / bitsandbytes optimizers bump no
    version). Compared with ``==`` alongside the tensors' identities, which the caller holds. An inference tensor
    among them makes a key nothing equals (``tensor_version``)."""
    return tuple(None if t is None else (tensor_version(t), t.data_ptr(), t.dtype, t.device, t.shape)
                 for t in tensors) + (optimizer_steps(),)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * (a @ b)``, alpha applied before the product's one rounding to its dtype (addmm's alpha, in fp32 on
    the CPU and in cuBLAS), never to an unscaled product first: in fp16 ``a @ b`` alone can overflow where the
    scaled one does not (a LoRA gradient dA = s vᵀx with s = 0.25 was formed as 4 dA: inf from |dA| ~ 16k)."""
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=alpha)


def kept_transpose(store: dict, key: str, w: torch.Tensor, keep: bool = True) -> torch.Tensor:
    """``w.t()``, kept in ``store[key]`` and handed out again while ``w`` (identity), its memory, dtype, device and
    shape are the same: the same view object between calls (a cache keyed on identity, DoRA's norm, then hits). A
    fresh view when not ``keep``, while W requires grad (a kept view would be no autograd edge to a W unfrozen since)
    and while tracing or under a torch.func transform."""
    if not keep or w.requires_grad or tracing_or_transformed():
        return w.t()
    hit = store.get(key)
    if hit is not None and hit[0] is w and hit[1].data_ptr() == w.data_ptr() and hit[1].dtype == w.dtype \
            and hit[1].device == w.device and hit[1].shape == w.shape[::-1]:
        return hit[1]
    wt = w.t()
    store[key] = (w, wt)
    return wt


def held(tensors) -> tuple:
    """Detached views of ``tensors`` (None kept), stored beside a value kept under ``kept_state``-style keys: their
    memory stays allocated while the value is kept, so a Parameter whose ``.data`` is swapped (``set_delta``, a load)
    gets a new address and the key's data pointer changes. Without them the allocator could hand the freed block
    back at once, version and address then equal, and the stale value was returned (a sparse delta's values cast
    for eval: the old delta applied after ``reselect``)."""
    return tuple(None if t is None else t.detach() for t in tensors)


def cast_params(params: tuple, dtype: torch.dtype, store: dict | None = None, slot: str = "casts") -> tuple:
    """``params`` (tensors, None kept) in ``dtype`` for one call: fp32 adapters (PEFT's default on a bf16 / fp16
    model, and QLoRA's) cast to the dtype the layer computes in. As they are when every one has it already. With a
    gradient to take, by autograd-recorded ``.to`` (the gradients reach the fp32 Parameters); without one (decode,
    evaluation) the casts are kept in ``store[slot]`` while the tensors stay the same (identity, version, storage and
    the optimizer-step count: a dtype, device or shape change swaps the storage), a cast kernel fewer per tensor and
    call (the lookup ~1.4 µs on the CPU, 1.9 with kept_state's full key); not while torch.compile traces or
    a torch.func transform runs (no version to key on there), nor while a CUDA graph is captured (the cast kernel
    goes into the graph: a kept cast read by the graph would be replaced, and freed, at the next update), nor
    without a ``store``."""
    if all(p is None or p.dtype == dtype for p in params):
        return params
    if store is None or tracing_or_transformed() or capturing() or (
            torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)):
        return tuple(p if p is None or p.dtype == dtype else p.to(dtype) for p in params)
    state = (optimizer_steps(), dtype, *[None if p is None else (tensor_version(p), p.data_ptr()) for p in params])
    kept = store.get(slot)
    if kept is None or kept[1] != state or not all(map(operator.is_, params, kept[0])):
        with torch.no_grad(), outside_inference_mode():
            kept = store[slot] = (params, state, tuple(None if p is None else p.detach().to(dtype) for p in params),
                                  held(params))
    return kept[2]


def outside_inference_mode():
    """A context in which tensors a layer keeps across calls are made as normal tensors, even when the call runs in
    ``torch.inference_mode`` (serving): an inference tensor kept and read later by a training step could not be
    saved for backward, nor written in place, and has no version counter to key a cache on."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the inference-mode query (a graph break)
        return contextlib.nullcontext()
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (a host sync there is an error, and a
    host value is baked into the graph). ``kernels._common.capturing`` is the kernels' own copy: they import
    only torch and triton."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def draw_seed(device=None):
    """A dropout seed drawn from torch's default CPU generator, so ``torch.manual_seed`` makes runs
    repeatable and ``torch.utils.checkpoint`` (which restores that generator) redraws the same one.

    Eager: a Python int. While torch.compile traces: the same draw as a one-element int64 tensor on
    ``device`` (``.item()`` would break the graph), which the reference ops and the kernels read as the
    seed without a host sync. The compiled graph draws it from the default CPU generator on every call
    (inductor's RNG is seeded from that generator too), so seeding and checkpointing behave as in eager.

    Under ``torch.func`` transforms: the one-element tensor too, which ``vmap(..., randomness="different")`` draws
    per sample (each sample its own mask; ``"same"``: one for all).

    While a CUDA graph is being captured (``torch.cuda.graph``, ``make_graphed_callables``) on ``device``'s
    stream: a one-element tensor drawn by ``device``'s own generator, whose draws CUDA graphs replay with a
    fresh Philox offset each time. A host int would be baked into the graph, and every replay would drop
    the same elements.
    """
    if (device is not None and torch.device(device).type == "cuda" and not torch.compiler.is_compiling()
            and capturing()):
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if torch.compiler.is_compiling():
        return seed.to(device) if device is not None else seed
    if torch._C._are_functorch_transforms_active():  # a tensor there: per sample under vmap(randomness="different")
        return seed
    return int(seed.item())


def _seed_arg(seed):
    """The seed as the Functions and kernels take it: 0 for None, a drawn tensor as it is, else an int."""
    if seed is None:
        return 0
    return seed if isinstance(seed, torch.Tensor) else int(seed)


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device, x on the CPU or a CUDA device (as on the kernel paths); without
    ``x.device.type`` (0.17 µs), read at every call."""
    return torch.is_autocast_enabled("cuda" if x.is_cuda else "cpu")


def autocast_inputs(x: torch.Tensor, *tensors):
    """``(x, *tensors)`` cast to the autocast dtype when autocast is on for x's device, as nn.Linear's matmul would
    cast them: floating tensors but float64 (autocast's own rule), None kept; the kernels then run with autocast
    off."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (x, *tensors))


def base_grads(dy, x, weight, need_w: bool, need_b: bool) -> tuple:
    """``(dW, db)`` of the frozen base layer, each None unless required: dW = dY^T x, db = sum_m dY."""
    dw = (dy.t() @ x).to(weight.dtype) if need_w else None
    db = dy.sum(0) if need_b else None
    return dw, db


def _bucket(m: int) -> int:
    """Token counts within a power of two share a measured GEMM choice."""
    return 1 << max(0, int(m) - 1).bit_length()
