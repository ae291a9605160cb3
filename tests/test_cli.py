"""The console entry point, run as a user would (a separate process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from m3shm import __version__
from m3shm.dataset import default_dataset


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m3shm.cli", *args], capture_output=True,
                          text=True, timeout=120, env=os.environ.copy())


def test_version_and_help() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"m3shm {__version__}"
    r = run("--help")
    assert r.returncode == 0 and "codec-stats" in r.stdout


def test_codec_stats_json_on_the_shared_dataset() -> None:
    if not default_dataset().exists():
        pytest.skip("shared dataset not present")
    r = run("codec-stats", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["series"] == 941 and out["samples"] == 422_715 and out["lossless"] is True
    assert 0 < out["bytes_per_sample"] < 16


def test_codec_stats_names_a_bad_file(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"metric": {}, "values": [1], "timestamps": [1, 2]}\n')
    r = run("codec-stats", "--dataset", str(bad))
    assert r.returncode == 1 and "bad.jsonl:1" in r.stderr and "1 values" in r.stderr
    assert "Traceback" not in r.stderr
