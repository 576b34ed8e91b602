"""`fscs demo --quick`: the whole offline pipeline (shards, torchrun training x2, benchmark, table) end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_quick_writes_table_and_results(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fscs", "demo", "--quick", "--out", str(out),
                           "--shards", str(tmp_path / "shards")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "RESULTS.md").read_text()
    for regime in ("weak", "full"):
        for setting in ("1w1s", "2w1s"):
            assert f"| {regime} | {setting} |" in report
            res = json.loads((out / regime / "results" / f"{regime}_{regime}_fold0_{setting}.json").read_text())
            assert res["world_size"] == 2 and res["regime"] == regime and len(res["manifest_hash"]) == 64
    assert "| weak | 1w1s |" in proc.stdout
    assert (out / "report" / "index.html").is_file() and (out / "report" / "LEADERBOARD.md").is_file()
    assert "report/index.html" in proc.stdout
