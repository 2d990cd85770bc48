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
