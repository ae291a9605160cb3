"""The pure-C stress tests, each built and run under ThreadSanitizer and under ASan+UBSan:

- tests/test_lane_stress.c: producer threads and a consumer on small, wrapping lanes; every
  record exactly once, in order, and no data race on lane memory;
- tests/test_reclaim_stress.c: an owner thread flushing, releasing, expiring and reusing memory
  while reader threads walk and decode every series in read sections; no reader ever sees
  reused memory.

Each program prints a line starting with "ok " and exits 0 when it passes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# lane.c drains through the aggregation store (aggstore.c), which applies forwarded rollup
# records (rollup.c) to cells (aggwin.c)
CORE = ["csrc/segment.c", "csrc/lane.c", "csrc/series.c", "csrc/arena.c", "csrc/epoch.c",
        "csrc/block.c", "csrc/codec.c", "csrc/aggstore.c", "csrc/aggwin.c", "csrc/rollup.c"]


@pytest.mark.parametrize("sanitizer", ["thread", "address,undefined"])
@pytest.mark.parametrize("program", ["lane_stress", "reclaim_stress"])
def test_c_stress(tmp_path, program, sanitizer):
    cc = shutil.which("clang") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (clang or gcc) found")
    exe = tmp_path / program
    subprocess.run([cc, "-std=c11", "-O1", "-g", "-D_GNU_SOURCE", "-DM3_DEBUG=1",
                    f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-Icsrc",
                    f"tests/test_{program}.c", *CORE, "-o", str(exe), "-lpthread", "-lm"],
                   cwd=ROOT, check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                       env={"TSAN_OPTIONS": "halt_on_error=1", "ASAN_OPTIONS": "detect_leaks=1",
                            "UBSAN_OPTIONS": "halt_on_error=1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok ") and "WARNING: ThreadSanitizer" not in r.stderr
