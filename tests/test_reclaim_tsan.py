"""The pure-C reclamation stress test (tests/test_reclaim_stress.c) under ThreadSanitizer and
under ASan+UBSan: an owner thread flushing, releasing, expiring and reusing memory while reader
threads walk and decode every series in read sections; no reader ever sees reused memory."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["tests/test_reclaim_stress.c", "csrc/series.c", "csrc/arena.c", "csrc/epoch.c",
           "csrc/block.c", "csrc/lane.c", "csrc/segment.c", "csrc/codec.c"]


@pytest.mark.parametrize("sanitizer", ["thread", "address,undefined"])
def test_reclaim_stress_in_c(tmp_path, sanitizer):
    cc = shutil.which("clang") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (clang or gcc) found")
    exe = tmp_path / "reclaim_stress"
    subprocess.run([cc, "-std=c11", "-O1", "-g", "-D_GNU_SOURCE", "-DM3_DEBUG=1",
                    f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-Icsrc", *SOURCES,
                    "-o", str(exe), "-lpthread", "-lm"], cwd=ROOT, check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                       env={"TSAN_OPTIONS": "halt_on_error=1", "ASAN_OPTIONS": "detect_leaks=1",
                            "UBSAN_OPTIONS": "halt_on_error=1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok ") and "WARNING: ThreadSanitizer" not in r.stderr
