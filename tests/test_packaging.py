"""``pip install .`` (non-editable) puts the top-level kernels/ and benchmarks/ folders at
fastpeft.kernels and fastpeft/benchmarks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_provides_fastpeft_kernels(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (target / "fastpeft" / "kernels" / "__init__.py").is_file()
    assert (target / "fastpeft" / "kernels" / "lora.py").is_file()
    assert (target / "fastpeft" / "benchmarks" / "bench_lora.py").is_file()  # fastpeft bench's harness
    assert (target / "fastpeft" / "demo" / "data.py").is_file()  # fastpeft demo, a subpackage
    assert not (target / "kernels").exists()  # installed under fastpeft/, not as a top-level package
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("import fastpeft, fastpeft.kernels as k, fastpeft.demo; from pathlib import Path; "
            f"assert Path(k.__file__).is_relative_to({str(target)!r}), k.__file__; print(k.HAS_TRITON)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
