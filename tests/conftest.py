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
