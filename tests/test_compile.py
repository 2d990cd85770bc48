"""torch.compile(fullgraph=True) over every public op and layer, in training mode with dropout and
``seed=None``: no graph breaks (``torch._dynamo.explain``), and the compiled forward and gradients equal
eager's bit for bit. The seed is then drawn inside the graph as a tensor (``functional.draw_seed``) from
torch's default CPU generator, so one ``torch.manual_seed`` gives eager and compiled runs the same seed and
the same dropout mask.

CPU: the reference backend, and the triton backend under TRITON_INTERPRET (where its ops are opaque custom
ops), compiled with ``aot_eager`` (dynamo and AOT autograd, where graph breaks and tracing failures come
from; inductor's C++ codegen is slow on CPU) and one layer with inductor. GPU (marker ``gpu``): the triton
backend on CUDA with inductor.
"""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastpeft
from fastpeft import kernels

CPU_BACKENDS = ["reference"] + (["triton"] if kernels.HAS_TRITON and kernels.INTERPRET else [])
GPU = torch.cuda.is_available() and not kernels.INTERPRET


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _op_cases(dev, dtype, block_size=16):
    """name -> (fn, args): each public op with dropout 0.1 and seed=None; the args that require grad are
    the leaves whose gradients are compared."""
    g = _g()

    def t(*shape, grad=False, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype).requires_grad_(grad)

    m, k, n = 7, 48, 40
    x, w, b = t(2, m, k, grad=True), t(n, k, scale=k ** -0.5), t(n)
    a, bb = t(8, k, grad=True, scale=k ** -0.5), t(n, 8, grad=True, scale=0.3)
    sa, sb = t(3, 8, k, grad=True, scale=k ** -0.5), t(3, n, 8, grad=True, scale=0.3)
    scalings = torch.tensor([2.0, 1.0, 0.5], device=dev)
    ranks = torch.tensor([8, 4, 2], device=dev)
    rates = torch.tensor([0.1, 0.0, 0.2], device=dev)
    ids = torch.tensor([[0, 1, -1, 2, 0, 1, 2], [2, 2, 0, -1, 1, 0, 0]], device=dev)
    idx = torch.randperm(n * k, generator=g)[:60].sort().values.to(dev)
    vals = t(60, grad=True, scale=0.1)
    rb, cb = -(-n // block_size), -(-k // block_size)
    bidx = torch.tensor([[i // cb, i % cb] for i in range(0, rb * cb, 2)], device=dev)  # edge blocks clipped
    bvals = t(bidx.shape[0], block_size, block_size, grad=True, scale=0.1)
    return {
        "lora_linear": (lambda x, a, bb: fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.1), (x, a, bb)),
        "lora_linear_multi": (lambda x, sa, sb: fastpeft.lora_linear_multi(x, w, b, sa, sb, scalings, ids, ranks,
                                                                           dropout_p=rates), (x, sa, sb)),
        "sparse_delta_linear": (lambda x, v: fastpeft.sparse_delta_linear(x, w, b, idx, v), (x, vals)),
        "lora_sparse_linear": (lambda x, a, bb, v: fastpeft.lora_sparse_linear(x, w, b, a, bb, 2.0, idx, v,
                                                                               dropout_p=0.1), (x, a, bb, vals)),
        f"lora_sparse_linear-b{block_size}": (lambda x, a, bb, v: fastpeft.lora_sparse_linear(
            x, w, b, a, bb, 2.0, bidx, v, block_size, dropout_p=0.1), (x, a, bb, bvals)),
    }


def _layer_cases(dev, dtype, block_size=16):
    """name -> (module in training mode, extra forward args): each layer kind with dropout 0.1."""
    torch.manual_seed(0)
    kw = dict(device=dev, dtype=dtype)
    lora = fastpeft.FastLoRALinear(48, 40, r=8, lora_dropout=0.1, init_lora_weights=False, **kw)
    mixed = fastpeft.FastLoRALinear(48, 40, r=8, lora_dropout=0.1, init_lora_weights=False, **kw)
    mixed.add_adapter("b", 4, 8, lora_dropout=0.2, init_lora_weights=False)
    for p in mixed.parameters():
        p.requires_grad_(p is not mixed.weight and p is not mixed.bias)  # both adapters train
    ids = torch.tensor([[0, 1, -1], [1, 1, 0]], device=dev)
    rosa = fastpeft.FastLoRALinear(48, 40, r=8, lora_dropout=0.1, init_lora_weights=False, sparse_density=0.05, **kw)
    rosa_b = fastpeft.FastLoRALinear(48, 40, r=8, lora_dropout=0.1, init_lora_weights=False, sparse_density=0.3,
                                     sparse_block_size=block_size, **kw)
    sparse = fastpeft.SparseDeltaLinear(48, 40, density=0.05, **kw)
    dora = fastpeft.FastLoRALinear(48, 40, r=8, lora_dropout=0.1, init_lora_weights=False, use_dora=True, **kw)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16)).to(**kw)
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["0", "2"],
                                               init_lora_weights=False))
    with torch.no_grad():
        for mod in (rosa, rosa_b):
            for v in mod.sparse_values.values():
                v.normal_(std=0.1)
        sparse.delta_values.normal_(std=0.1)
    cases = {"FastLoRALinear": (lora, ()), "FastLoRALinear-adapter_ids": (mixed, (ids,)), "RoSA": (rosa, ()),
             f"RoSA-b{block_size}": (rosa_b, ()), "SparseDeltaLinear": (sparse, ()), "DoRA": (dora, ()),
             "injected-model": (model, ())}
    return {name: (mod.train(), extra) for name, (mod, extra) in cases.items()}


def _run(fn, args, leaves=None, rng_seed=5):
    """Output and the gradients of ``leaves`` (default: the args that require grad), after
    ``torch.manual_seed(rng_seed)``."""
    torch.manual_seed(rng_seed)
    y = fn(*args)
    if leaves is None:
        leaves = [a for a in args if a.requires_grad]
    return [y.detach()] + list(torch.autograd.grad(y.float().square().sum(), leaves))


def _module_fn(mod, extra):
    """(fn, args, leaves) for a layer: fn(x) = mod(x, *extra); leaves x and the trainable parameters."""
    x = torch.randn(2, 3, 48, generator=_g(1)).to(next(mod.parameters())).requires_grad_()
    return (lambda x: mod(x, *extra)), (x,), [x] + [p for p in mod.parameters() if p.requires_grad]


def _assert_same(got, want, what, exact=True):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        name = "y" if i == 0 else f"grad {i - 1}"
        if exact and not torch.equal(g, w):
            err = (g.double() - w.double()).abs()
            raise AssertionError(f"{what} {name}: compiled != eager, max |diff| {err.max():.3g} at "
                                 f"{tuple(int(j) for j in torch.unravel_index(err.argmax(), err.shape))}")
        if not exact:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")


def _compiled_matches_eager(fn, args, what, leaves=None, exact=True):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = _run(compiled, args, leaves)
    _assert_same(got, _run(fn, args, leaves), what, exact)
    return compiled, got


# Many adapters on the reference backend: eager groups the rows by adapter (GEMMs on each adapter's rows),
# compiled code runs every adapter on every row and keeps each row's own (no host sync). Same masks, same
# math, other GEMM shapes: equal to rounding, not bit for bit.
_GROUPED_IN_EAGER = {("lora_linear_multi", "reference"), ("FastLoRALinear-adapter_ids", "reference")}


# ---- CPU -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explain_no_graph_breaks(backend):
    """Every op and every layer, with dropout and seed=None in training mode, traces as one graph."""
    ops = _op_cases("cpu", torch.float32)
    layers = {name: _module_fn(mod, extra)[:2] for name, (mod, extra) in _layer_cases("cpu", torch.float32).items()}
    cases = {**ops, **layers}

    def everything(*flat):
        outs, i = [], 0
        for fn, args in cases.values():
            outs.append(fn(*flat[i:i + len(args)]))
            i += len(args)
        return outs
    flat = [a for _, args in cases.values() for a in args]
    torch._dynamo.reset()
    with fastpeft.use_backend(backend):
        explained = torch._dynamo.explain(everything)(*flat)
    reasons = [f"{br.reason.splitlines()[0]} at {br.user_stack[-1].filename}:{br.user_stack[-1].lineno}"
               for br in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


@pytest.mark.parametrize("case", ["lora_linear", "lora_sparse_linear"])
def test_torch_2_11_workaround_compiles_the_same(case, monkeypatch):
    """The clone the Functions return while tracing on torch 2.11 (``ops.common.returned``, pytorch#180642:
    there the compiled gradients are otherwise zero), forced on this torch: the same bits as eager, also
    under inductor (which drops the clone)."""
    import torch._inductor.config as inductor_config

    from fastpeft.ops import common

    monkeypatch.setattr(common, "_CLONE_RETURNED", True)
    fn, args = _op_cases("cpu", torch.float32)[case]
    with fastpeft.use_backend("reference"):
        _compiled_matches_eager(fn, args, f"{case} with the clone")
        with inductor_config.patch(fallback_random=True):  # torch's RNG ops kept: eager's seed (test_inductor_layer)
            torch._dynamo.reset()
            got = _run(torch.compile(fn, fullgraph=True), args)
        _assert_same(got, _run(fn, args), f"{case} with the clone, inductor", exact=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(_op_cases("cpu", torch.float32)))
def test_op_compiled_matches_eager(case, backend):
    fn, args = _op_cases("cpu", torch.float32)[case]
    with fastpeft.use_backend(backend):
        compiled, first = _compiled_matches_eager(fn, args, f"{case}-{backend}",
                                                  exact=(case, backend) not in _GROUPED_IN_EAGER)
        if case == "lora_linear":
            # The seed is drawn on every call (not baked into the graph), from torch's generator.
            torch.manual_seed(5)
            compiled(*args)
            again = compiled(*args)
            assert not torch.equal(again, first[0]), "a second call without reseeding reused the dropout mask"
            _assert_same(_run(compiled, args), first, f"{case}-{backend} reseeded")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(_layer_cases("cpu", torch.float32)))
def test_layer_compiled_matches_eager(case, backend):
    fn, args, leaves = _module_fn(*_layer_cases("cpu", torch.float32)[case])
    with fastpeft.use_backend(backend):
        _compiled_matches_eager(fn, args, f"{case}-{backend}", leaves, exact=(case, backend) not in _GROUPED_IN_EAGER)


def test_dynamic_shapes_compile_fullgraph_and_match_eager():
    """``torch.compile(dynamic=True, fullgraph=True)``: sizes are symbolic, with dropout too (the CPU stream's word
    range once went through ``divmod``, which dynamo cannot trace on symbolic ints); every op and layer matches
    eager, at its own row count and at another one (LoRA and DoRA without recompiling for it; the sparse CPU path
    picks its way by size, so RoSA may)."""
    cases = {**_op_cases("cpu", torch.float32),
             **{name: _module_fn(mod, extra)[:2] for name, (mod, extra) in _layer_cases("cpu", torch.float32).items()}}
    with fastpeft.use_backend("reference"):
        for name, (fn, args) in cases.items():
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
            _assert_same(_run(compiled, args), _run(fn, args), f"{name} dynamic",
                         exact=(name, "reference") not in _GROUPED_IN_EAGER)
            if name in ("lora_linear", "FastLoRALinear", "DoRA", "RoSA"):  # 2 x 5 rows instead of 2 x 7 / 2 x 3
                x = args[0][:, :5 if args[0].shape[1] > 5 else 2].detach().clone().requires_grad_()
                more = (x,) + tuple(args[1:])
                with torch._dynamo.config.patch(error_on_recompile=name != "RoSA"):
                    _assert_same(_run(compiled, more), _run(fn, more), f"{name} dynamic, other rows")


def test_use_backend_inside_compiled_function():
    """A use_backend block inside the compiled function, and one around it (traced again on change)."""
    fn, args = _op_cases("cpu", torch.float32)["lora_linear"]

    def inner(*a):
        with fastpeft.use_backend("reference"):
            return fn(*a)
    torch._dynamo.reset()
    assert torch._dynamo.explain(inner)(*args).graph_break_count == 0
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for name in ("reference", "auto", "reference"):
        with fastpeft.use_backend(name):
            compiled(*args)
    assert counter.frame_count == 2  # traced again when the block changed; the third call reuses the first


def test_checkpoint_redraws_the_same_seed():
    """torch.utils.checkpoint restores the CPU generator before recomputing, so the recomputed forward
    draws the same seed: checkpointed gradients equal plain ones, around and inside a compiled layer."""
    fn, args, leaves = _module_fn(*_layer_cases("cpu", torch.float32)["FastLoRALinear"])
    want = _run(fn, args, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    around = _run(lambda x: checkpoint(compiled, x, use_reentrant=False), args, leaves)
    _assert_same(around, want, "checkpoint(compiled)")
    inside = torch.compile(lambda x: checkpoint(fn, x, use_reentrant=False), fullgraph=True, backend="aot_eager")
    _assert_same(_run(inside, args, leaves), want, "compiled(checkpoint)")


def test_inductor_layer(monkeypatch):
    """Inductor: with fallback_random (torch's RNG ops kept) the compiled layer equals eager; with its own
    RNG the seed still comes from torch's generator, so torch.manual_seed repeats a run."""
    import torch._inductor.config as inductor_config

    fn, args, leaves = _module_fn(*_layer_cases("cpu", torch.float32)["FastLoRALinear"])
    # config.patch, not monkeypatch: monkeypatch's undo leaves inductor's config without the attribute,
    # and every later compile in the session then fails ("fallback_random does not exist").
    with inductor_config.patch(fallback_random=True):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        _assert_same(_run(compiled, args, leaves), _run(fn, args, leaves), "inductor", exact=False)
    with inductor_config.patch(fallback_random=False):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        first = _run(compiled, args, leaves)
        _assert_same(_run(compiled, args, leaves), first, "inductor reseeded")


# ---- GPU only --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_explain_no_graph_breaks(dtype):
    cases = {**_op_cases("cuda", dtype),
             **{name: _module_fn(mod, extra)[:2] for name, (mod, extra) in _layer_cases("cuda", dtype).items()}}
    with fastpeft.use_backend("triton"):
        for name, (fn, args) in cases.items():
            torch._dynamo.reset()
            explained = torch._dynamo.explain(fn)(*args)
            assert explained.graph_break_count == 0, (name, [br.reason for br in explained.break_reasons])


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(_op_cases("cpu", torch.float32)) + list(_layer_cases("cpu", torch.float32)))
def test_gpu_compiled_matches_eager(case, monkeypatch):
    """The triton backend on CUDA under inductor, fp32. fallback_random keeps torch.randint, so the seed
    (and the mask) is eager's; inductor may fuse the torch ops around the kernels, hence a tight tolerance
    rather than bit equality."""
    import torch._inductor.config as inductor_config

    ops = _op_cases("cuda", torch.float32)
    fn, args, leaves = ops[case] + (None,) if case in ops else _module_fn(*_layer_cases("cuda", torch.float32)[case])
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    with fastpeft.use_backend("triton"):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        first = _run(compiled, args, leaves)
        _assert_same(first, _run(fn, args, leaves), f"gpu {case}", exact=False)
        _assert_same(_run(compiled, args, leaves), first, f"gpu {case} reseeded")  # same seed: the same bits


@pytest.mark.gpu
def test_gpu_bf16_seed_none_repeatable_under_inductor_rng():
    """Inductor's own RNG (no fallback): the seed is still drawn from torch's CPU generator, so a reseeded
    compiled run repeats bit for bit, and two calls in a row draw different masks."""
    fn, args = _op_cases("cuda", torch.bfloat16)["lora_linear"]
    with fastpeft.use_backend("triton"):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        first = _run(compiled, args)
        _assert_same(_run(compiled, args), first, "reseeded")
        assert not torch.equal(compiled(*args), first[0])
