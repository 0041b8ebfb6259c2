"""The GPU check script's smoke mode: every stage at the smallest size on the CPU, so the
script cannot rot while no GPU is around."""

import json
import subprocess
import tarfile

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--budget", "600",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert {r["stage"] for r in rows} == {"env", "correctness", "speed", "sweeps", "science"}
    assert all(r["passed"] is not False for r in rows), [r for r in rows if r["passed"] is False]
    assert p.stdout.rstrip().splitlines()[-1].startswith("| science")  # the summary table comes last
    archive = tmp_path / "gpu_check.tar.gz"
    assert archive.stat().st_size < 16 * 2**20
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("bench.csv") for n in names) and any(n.endswith("runs.csv") for n in names)
