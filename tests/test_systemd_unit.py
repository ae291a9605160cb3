"""packaging/m3shm.service: systemd-analyze accepts it without a word, and the daemon really
runs under the sandbox it asks for (its SystemCallFilter as a seccomp allow-list built from
systemd-analyze's own group lists, and MemoryDenyWriteExecute as the kernel's PR_SET_MDWE),
through ingest, export, /metrics, a SIGHUP reload and a clean stop."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_daemon_harness import Daemon, now_ms

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "m3shm.service"
INSTALLED = "/opt/m3shm/bin/m3shm"
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


@needs_analyze
def test_unit_file_verifies_without_warnings(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert text.count(INSTALLED) == 1
    # verify checks that ExecStart exists: point it at this checkout's entry point
    exe = ROOT / ".venv" / "bin" / "m3shm"
    if not exe.exists():
        pytest.skip("no .venv/bin/m3shm (run make build)")
    unit = tmp_path / "m3shm.service"
    unit.write_text(text.replace(INSTALLED, str(exe)))
    p = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 0 and not p.stderr.strip() and not p.stdout.strip(), \
        p.stdout + p.stderr
    s = unit_settings()
    for key, want in (("Type", "notify"), ("NotifyAccess", "main"),
                      ("ExecReload", "/bin/kill -HUP $MAINPID"), ("ProtectSystem", "strict"),
                      ("NoNewPrivileges", "yes"), ("SystemCallArchitectures", "native")):
        assert s.get(key) == [want], key
    assert "WatchdogSec" in s and "LimitNOFILE" in s and "ReadWritePaths" in s


@functools.cache
def _group(name: str) -> frozenset[str]:
    """Every syscall of a systemd syscall group, nested groups expanded."""
    p = subprocess.run([ANALYZE, "syscall-filter", name], capture_output=True, text=True,
                       check=True, timeout=60)
    out: set[str] = set()
    for line in p.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        out |= _group(item) if item.startswith("@") else {item}
    return frozenset(out)


def _sandbox(syscalls: frozenset[str], mdwe: bool):  # noqa: ANN202 - a preexec_fn
    lib = ctypes.util.find_library("seccomp")
    if lib is None:
        pytest.skip("libseccomp is not installed")
    sc = ctypes.CDLL(lib, use_errno=True)
    sc.seccomp_init.restype = ctypes.c_void_p
    sc.seccomp_init.argtypes = [ctypes.c_uint32]
    sc.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                    ctypes.c_uint]
    sc.seccomp_load.argtypes = [ctypes.c_void_p]
    nrs = [n for n in (sc.seccomp_syscall_resolve_name(s.encode()) for s in sorted(syscalls))
           if n >= 0]
    libc = ctypes.CDLL(None, use_errno=True)
    if mdwe and libc.prctl(66, 0, 0, 0, 0) < 0:  # PR_GET_MDWE: kernel >= 6.3
        pytest.skip("this kernel has no PR_SET_MDWE to stand in for MemoryDenyWriteExecute")
    errno_eperm = 0x00050000 | 1     # SCMP_ACT_ERRNO(EPERM), as SystemCallErrorNumber=EPERM
    allow = 0x7FFF0000               # SCMP_ACT_ALLOW

    def apply() -> None:  # in the child, before exec
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        if mdwe and libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
            raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
        ctx = sc.seccomp_init(errno_eperm)
        for nr in nrs:
            sc.seccomp_rule_add(ctx, allow, nr, 0)
        if sc.seccomp_load(ctx) != 0:
            raise OSError("seccomp_load failed")

    return apply


@needs_analyze
def test_daemon_runs_under_the_units_sandbox(tmp_path: Path) -> None:
    s = unit_settings()
    allowed: set[str] = set()
    for item in " ".join(s["SystemCallFilter"]).split():
        allowed |= _group(item) if item.startswith("@") else {item}
    # systemd always permits these for the service's own exec (systemd.exec(5))
    allowed |= {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
    mdwe = s.get("MemoryDenyWriteExecute") == ["yes"]
    apply = _sandbox(frozenset(allowed), mdwe)

    d = Daemon(tmp_path)
    d.start(preexec_fn=apply)
    try:
        t = now_ms()
        series = [({"__name__": "sandboxed", "i": str(i)}, [(t + k, float(k)) for k in range(5)])
                  for i in range(50)]
        assert d.write(series)[0] == 204
        got = d.export_map('{__name__="sandboxed"}')
        assert len(got) == 50 and all(len(v) == 5 for v in got.values())
        assert d.get("/metrics")[0] == 200
        before = d.log.read_text().count("applied by every worker")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while d.log.read_text().count("applied by every worker") == before:
            assert time.monotonic() < deadline, d.logtext()
            time.sleep(0.05)
    finally:
        code = d.stop()
    log = d.log.read_text()
    assert code == 0, log
    assert "Operation not permitted" not in log and "Traceback" not in log, log
