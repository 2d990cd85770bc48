"""Shared test setup. TRITON_INTERPRET must be set before triton is first imported (by fastpeft.kernels),
so that kernels run on CPU tensors here; tests needing a GPU carry the ``gpu`` marker and skip."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTPEFT_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tf32_on_the_card():
    """TF32 allowed for fp32 matmuls on a card (restored after): there the ops offer the TMA kernels to their timed
    choices in fp32 only then (``kernels.lora_tma.tma_precision_ok``). No change under the interpreter."""
    prev = torch.get_float32_matmul_precision()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(prev)


@pytest.fixture
def kernel_stream_reference():
    """The reference backend on CPU tensors draws the kernels' Philox masks (the oracle) in the test, so
    that tests comparing the kernels with the reference backend compare the same masks."""
    from fastpeft.reference import kernel_stream_on_cpu

    with kernel_stream_on_cpu():
        yield


def triton_backend_device() -> str:
    """The device of the kernel tests, called at a test module's import: "cuda" on a GPU, "cpu" under
    TRITON_INTERPRET=1; skips the whole module where the triton backend cannot run."""
    pytest.importorskip("triton")
    from fastpeft import kernels

    if not kernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
    return "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"


def bitsandbytes_or_skip():
    """bitsandbytes (through fastpeft's import, which keeps it from taking the checkout's kernels/ folder for Hugging
    Face's kernels package), or the calling test module skipped where it is not installed."""
    from fastpeft.quant import import_bitsandbytes

    try:
        return import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed", allow_module_level=True)


def lora_inputs(g: torch.Generator, m, k, n, r, bias=True, lead=()) -> list:
    """x (*lead, m, k), W (n, k), bias (n,) or None, A (r, k), B (n, r) of a LoRA linear, float64 on the CPU,
    drawn from ``g`` in that order; W, A and B scaled so that the products stay O(1)."""
    x = torch.randn(*lead, m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(r, k, generator=g, dtype=torch.float64) / k ** 0.5
    bb = torch.randn(n, r, generator=g, dtype=torch.float64) / r ** 0.5
    return [x, w, b, a, bb]


def loss_step(model, ids, key) -> tuple:
    """``(logits, {key(name): grad})`` of one causal-LM loss on ``ids`` (labels = ids): every parameter with a gradient
    whose ``key(name)`` is not None."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        k = key(n) if p.grad is not None else None
        if k is not None:
            grads[k] = p.grad
    return out.logits.detach(), grads


def train_steps(model, ids, steps: int, lr: float = 1e-2) -> list:
    """The losses of ``steps`` AdamW steps of a causal LM on ``ids`` (labels = ids), its trainable parameters only."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def peft_and_fastpeft_mixed_batches(pm, base, a, b, ids) -> tuple:
    """``(PEFT's, fastpeft's)`` logits of one batch with a per-sequence adapter: ``pm`` (a PeftModel holding
    "default", saved in folder ``a``) gets folder ``b`` as adapter "b" and runs ``adapter_names=["b", "__base__",
    "default"]``; a copy of ``base`` loads both folders with fastpeft and runs ``mixed_batch(["b", None, "a"])``."""
    import copy

    import fastpeft

    pm.load_adapter(b, adapter_name="b")
    pm.eval()
    model = fastpeft.load_adapter(copy.deepcopy(base), a, adapter_name="a")
    fastpeft.load_adapter(model, b, adapter_name="b")
    model.eval()
    with torch.no_grad():
        want = pm(ids, adapter_names=["b", "__base__", "default"]).logits  # PEFT's first adapter: "default"
        with fastpeft.mixed_batch(model, ["b", None, "a"]):
            got = model(ids).logits
    return want, got, model


# Every dtype the kernels take, by the names test ids use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = ""):
    """assert_close that names the worst element on failure."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    if not bool((err <= bound).all()):
        idx = int((err - bound).argmax())
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape))
        raise AssertionError(f"{what}: worst element at {pos}: got {a.flatten()[idx]:.6g}, expected "
                             f"{e.flatten()[idx]:.6g} (|err| {err.flatten()[idx]:.3g} > {bound.flatten()[idx]:.3g}); "
                             f"max |err| {err.max():.3g}")


# Hypothesis profiles (tests/test_randomized.py). "ci", the default: 60 examples per test, the same ones
# on every run (derandomized, no example database), so that CI is bounded and reproducible. "long":
# `pytest --hypothesis-profile=long tests/test_randomized.py` (or HYPOTHESIS_PROFILE=long), 260 fresh
# examples per test (over 1000 in all); a failure prints a @reproduce_failure blob that replays it.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; only the randomized tests need it
    settings = None
if settings is not None:
    _SLOW_OK = dict(deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=60, derandomize=True, database=None, **_SLOW_OK)
    settings.register_profile("long", max_examples=260, **_SLOW_OK)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def assert_close_to_largest(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """fp32 agreement relative to the largest entry of ``want`` (single entries near zero carry the others'
    rounding), shapes equal."""
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= tol * max(want.abs().max().item(), 1e-30)
