"""benchmarks/device_check.sh's dry run: what comes back from a device call. The device tool returns at most 8
files from $OUT, so the script packs each step's tables into one archive under their benchmarks/results/ names."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")


def _dry_run(out: Path, only: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), "--smoke", f"--only={only}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_smoke_steps_come_back_as_one_archive_and_the_log(tmp_path):
    proc = _dry_run(tmp_path, "bench multi,bench dora")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files  # the device tool's limit
    archives = [f for f in files if f.endswith(".tar.gz")]
    logs = [f for f in files if f.endswith(".log")]
    assert len(archives) == 1 and len(logs) == 1 and len(files) == 2, files
    assert archives[0].startswith("device-check-cpu-smoke-") and "-only-" in archives[0]
    with tarfile.open(tmp_path / archives[0]) as tar:
        names = sorted(Path(n).name for n in tar.getnames() if n not in (".", "./"))
        stamp = archives[0][len("device-check-cpu-smoke-"):][:10]
        assert names == sorted(f"bench-{op}-cpu-smoke-{stamp}.{ext}" for op in ("multi", "dora")
                               for ext in ("json", "md")), names
        md = tar.extractfile(f"./bench-dora-cpu-smoke-{stamp}.md").read().decode()
    assert "fastpeft-dora" in md  # the table itself, not an empty file
    assert "bench multi: rc=0" in proc.stdout and "bench dora: rc=0" in proc.stdout


@pytest.mark.slow
def test_each_step_keeps_the_shares_of_the_steps_after_it(tmp_path):
    """The card run's budget plan, walked here with stand-in commands (a python that runs ``-c`` for real and
    sleeps for anything else) and a budget too small for any step: every step is skipped, each naming the shares
    of the steps after it; the background warm-up is started and stopped, and $OUT holds only the log."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
                    'if [ "$1 $2" = "-m pip" ]; then exit 0; fi\nexec sleep 1000\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "BUDGET": "10"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # skipped steps fail the run
    kept = {"gpu-marked tests (autotuned; not compile / CUDA graphs)": 385,
            "kernel tests lora / lora_tma / multi / bgmv (explicit blocks)": 345,
            "kernel tests sparse + the floor's (explicit blocks)": 325, "bench lora 4096x4096": 245,
            "bench lora 4096x14336, 14336x4096": 210, "bench multi": 175, "bench sparse": 140, "bench qlora": 110,
            "bench dora": 80, "profile_lora": 0, "gpu-marked CUDA-graph + compile tests": 0}
    for name, seconds in kept.items():
        assert f"== SKIPPED {name}: the 10s budget is spent ({seconds}s kept for the later steps)" in proc.stdout
    assert "warm-up: 16 jobs" in proc.stdout and "warm-up stopped (the benches start)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["device_check.log"]
