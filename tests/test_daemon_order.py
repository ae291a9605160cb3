"""Replay reproduces the live path exactly: several clients write different values for the same
series and timestamps at the same moment, through different workers; what the daemon serves
before a crash (SIGKILL of everything) equals what it serves after commit-log replay. The owners
apply every shard's batches in global sequence order (csrc/lane.c), the order replay uses."""

from __future__ import annotations

import http.client
import threading

import snappy
from test_daemon_harness import Daemon, now_ms, write_request

CLIENTS = 4
ROUNDS = 60
NSERIES = 8


def _client(port: int, c: int, t0: int, barrier: threading.Barrier, acked: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for r in range(ROUNDS):
        series = [({"__name__": "race", "s": str(i)}, [(t0 + r, float(c * 1000 + r))])
                  for i in range(NSERIES)]
        body = snappy.compress(write_request(series))
        barrier.wait()
        conn.request("POST", "/api/v1/write", body, {
            "Content-Type": "application/x-protobuf", "Content-Encoding": "snappy"})
        resp = conn.getresponse()
        resp.read()
        acked.append(resp.status == 204)
        conn.close()  # a new connection per request: SO_REUSEPORT spreads them over workers
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def test_replay_matches_live_for_concurrent_overwrites(tmp_path):
    d = Daemon(tmp_path, workers=2).start()
    try:
        t0 = now_ms() - 60_000
        barrier = threading.Barrier(CLIENTS)
        acked: list[bool] = []
        threads = [threading.Thread(target=_client, args=(d.port, c, t0, barrier, acked))
                   for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(acked) == CLIENTS * ROUNDS and all(acked)
        live = d.export_map("race")
        assert len(live) == NSERIES and all(len(v) == ROUNDS for v in live.values())
        d.kill_all()
        d.start()
        assert d.export_map("race") == live
    finally:
        d.stop()
