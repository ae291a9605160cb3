"""/ready during recovery: after every process was SIGKILLed, a restarted daemon listens at
once but answers /ready with 503 (and Retry-After) while its workers replay the commit log,
and from the first 200 on, every acknowledged sample is readable."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from test_daemon_harness import Daemon, now_ms

NSERIES = 2000
ROUNDS = 100


def test_ready_is_503_until_replay_is_done(tmp_path):
    d = Daemon(tmp_path, series=1024, arena="8MiB").start()
    t0 = now_ms() - 5 * 60_000
    for r in range(ROUNDS):  # 200k samples for the workers to replay
        code, body, _ = d.write([({"__name__": "rdy", "i": str(i)}, [(t0 + r * 1000, float(r))])
                                 for i in range(NSERIES)])
        assert code == 204, body
    d.kill_all()
    d.start(wait=False)
    seen: list[int] = []
    retry_after = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{d.url}/ready", timeout=5) as resp:
                seen.append(resp.status)
                break
        except urllib.error.HTTPError as e:
            seen.append(e.code)
            retry_after = e.headers.get("Retry-After")
        except OSError:
            pass  # not listening yet
        time.sleep(0.002)
    assert seen and seen[-1] == 200, seen
    assert 503 in seen and retry_after == "1", seen  # it was asked while replaying
    rows = d.export('{__name__="rdy"}')
    assert len(rows) == NSERIES and all(len(r["timestamps"]) == ROUNDS for r in rows)
    assert d.stop() == 0
