"""Memory per active series: m3shm against VictoriaMetrics (and Prometheus) on the same load.

For each server, each run: start it on 127.0.0.1 in a fresh temporary directory, remote-write
the same ``--series`` node_exporter-like series (perf/nodegen.py: realistic label sets) in
``--rounds`` scrape rounds of one sample each (``--batch`` series per request, ``--conns``
keep-alive connections), wait until the server's memory settles, measure, run one query
(``count({__name__=~".+"})`` through /api/v1/query), let it settle again, measure again.

Memory is summed over every process of the server (the daemon and its descendants) from
/proc/PID/smaps_rollup: PSS (the shared segment counts once, split among the processes that
map it) and RSS (counts it once per process). For m3shm the PSS is broken down into
``shmem`` (the shared-memory segment, docs/formats/shm.md), ``anon`` (private memory: the
Python heaps, including each worker's query index, m3shm/storage/shm_index.py, which every
worker builds in the background after start) and ``file`` (code and mapped files), per
process too. Each figure is the median of ``--runs`` runs. Prints one JSON object.

    .venv/bin/python perf/memory.py [--series 1000000] [--rounds 3] [--runs 3]
                                    [--servers m3shm,victoria-metrics,prometheus]

Not part of CI (a million series take a few minutes per server and run).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from multiprocessing import get_context
from pathlib import Path

import snappy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nodegen  # noqa: E402
from ingest import process_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUERY = 'count({__name__=~".+"})'
SCRAPE_MS = 15_000


# -- processes and their memory ----------------------------------------------------------------
FIELDS = {"Rss": "rss", "Pss": "pss", "Pss_Anon": "anon", "Pss_Shmem": "shmem",
          "Pss_File": "file"}


def rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    for line in text.splitlines()[1:]:
        key, val = line.split(":", 1)
        if key in FIELDS:
            out[FIELDS[key]] = int(val.split()[0]) * 1024
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
    except OSError:
        return "?"


def memory(pid: int) -> dict:
    procs = []
    for p in process_tree(pid):
        r = rollup(p)
        if r:
            procs.append({"pid": p, "cmd": comm(p), **r})
    total = {k: sum(p.get(k, 0) for p in procs) for k in FIELDS.values()}
    return {"total": total, "procs": procs}


def settle(pid: int, max_s: float = 240, every: float = 2.0) -> dict:
    """Memory once PSS has stayed within 0.5% over three readings (or after max_s)."""
    seen: list[int] = []
    deadline = time.monotonic() + max_s
    while True:
        m = memory(pid)
        seen.append(m["total"]["pss"])
        last = seen[-3:]
        if len(last) == 3 and max(last) - min(last) <= 0.005 * max(last):
            m["settle_s"] = round(len(seen) * every, 1)
            return m
        if time.monotonic() > deadline:
            m["settle_s"] = None  # did not settle
            return m
        time.sleep(every)


# -- servers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, what: str) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} not ready after 120 s ({url})")


class Server:
    name = ""
    write_path = "/api/v1/write"

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"{self.name}.log", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=self.log,
                                     cwd=tmp)
        wait_ready(self.url + self.ready_path, self.proc, self.name)

    ready_path = "/ready"

    def command(self) -> list[str]:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class M3shm(Server):
    name = "m3shm"

    def config(self) -> str:
        a = self.args
        text = f"shards: {a.shards}\nworkers: {a.workers}\nquery:\n  max_series: 100000000\n"
        if self.shm():
            text += "shm:\n" + "".join(f"  {k}: {v}\n" for k, v in self.shm().items())
        return text

    def shm(self) -> dict:
        a = self.args
        return {k: v for k, v in (("series_per_shard", a.series_per_shard),
                                  ("arena_bytes", a.arena_bytes),
                                  ("lane_bytes", a.lane_bytes)) if v}

    def command(self) -> list[str]:
        cfg = self.tmp / "m3shm.yaml"
        cfg.write_text(self.config())
        return [sys.executable, "-c", "import sys; from m3shm.cli import main; "
                "sys.exit(main())", "serve", "-c", str(cfg), "--data", str(self.tmp / "data"),
                "--listen", f"127.0.0.1:{self.port}"]

    def settings(self) -> dict:
        from m3shm.config import Config

        d = Config().shm
        shm = {"series_per_shard": d.series_per_shard, "arena_bytes": d.arena_bytes,
               "lane_bytes": d.lane_bytes}
        shm.update(self.shm())
        return {"shards": self.args.shards, "workers": self.args.workers,
                "shm": shm, "explicit_shm_keys": sorted(self.shm())}


class Victoria(Server):
    name = "victoria-metrics"
    ready_path = "/health"

    def command(self) -> list[str]:
        return ["/usr/bin/victoria-metrics", f"-storageDataPath={self.tmp / 'vm'}",
                f"-httpListenAddr=127.0.0.1:{self.port}", "-retentionPeriod=100y",
                "-search.maxUniqueTimeseries=100000000", "-search.maxQueryDuration=10m"]


class Prometheus(Server):
    name = "prometheus"
    ready_path = "/-/ready"

    def command(self) -> list[str]:
        cfg = self.tmp / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 15s\n")
        return ["/usr/bin/prometheus", f"--config.file={cfg}",
                f"--storage.tsdb.path={self.tmp / 'prom'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-remote-write-receiver"]


SERVERS = {c.name: c for c in (M3shm, Victoria, Prometheus)}


# -- load --------------------------------------------------------------------------------------
def client(port: int, path: str, cid: int, args: argparse.Namespace, t0: int, q, go) -> None:
    """Build this connection's bodies (batches cid, cid + conns, ...), then send them round by
    round once ``go`` is set; report (ok, rejected, first error)."""
    nb = (args.series + args.batch - 1) // args.batch
    mine = range(cid, nb, args.conns)
    bodies = []
    for r in range(args.rounds):
        for b in mine:
            series = range(b * args.batch, min(args.series, (b + 1) * args.batch))
            lbs = [nodegen.labels_pb(i) for i in series]
            bodies.append(snappy.compress(nodegen.write_request(series, lbs, r,
                                                               t0 + r * SCRAPE_MS)))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    q.put("built")
    go.wait()
    ok = bad = 0
    err = ""
    for body in bodies:
        for _ in range(100):
            conn.request("POST", path, body, {"Content-Type": "application/x-protobuf",
                                              "Content-Encoding": "snappy",
                                              "X-Prometheus-Remote-Write-Version": "0.1.0"})
            resp = conn.getresponse()
            text = resp.read()
            if resp.status not in (429, 503):
                break
            time.sleep(float(resp.getheader("Retry-After") or 0.2))  # backpressure: retry
        if 200 <= resp.status < 300:
            ok += 1
        else:
            bad += 1
            err = err or f"{resp.status} {text[:300]!r}"
    q.put((ok, bad, err))


def load(srv: Server, args: argparse.Namespace) -> dict:
    ctx = get_context("fork")
    q, go = ctx.Queue(), ctx.Event()
    t0 = int(time.time() * 1000) - args.rounds * SCRAPE_MS - 60_000
    ps = [ctx.Process(target=client, args=(srv.port, srv.write_path, c, args, t0, q, go))
          for c in range(args.conns)]
    for p in ps:
        p.start()
    for _ in ps:
        assert q.get() == "built"
    start = time.perf_counter()
    go.set()
    res = [q.get() for _ in ps]
    for p in ps:
        p.join()
    return {"requests_ok": sum(r[0] for r in res), "requests_rejected": sum(r[1] for r in res),
            "first_error": next((r[2] for r in res if r[2]), None),
            "ingest_s": round(time.perf_counter() - start, 1)}


def query(srv: Server) -> dict:
    data = urllib.parse.urlencode({"query": QUERY}).encode()
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(srv.url + "/api/v1/query", data, timeout=600) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        return {"query": QUERY, "error": f"{e.code} {e.read()[:300]!r}",
                "seconds": round(time.perf_counter() - t, 2)}
    res = body.get("data", {}).get("result", [])
    return {"query": QUERY, "value": res[0]["value"][1] if res else None,
            "seconds": round(time.perf_counter() - t, 2)}


def one_run(name: str, args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"m3shm-mem-{name}-"))
    srv = SERVERS[name](tmp, args)
    try:
        out = {"settings": srv.settings(), **load(srv, args)}
        out["settled"] = settle(srv.proc.pid)
        out["query"] = query(srv)
        if name == "m3shm":  # each worker has its own index: query until several answered
            for _ in range(2 * args.workers):
                query(srv)
        out["after_query"] = settle(srv.proc.pid)
        return out
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def per_series(runs: list[dict], stage: str, key: str, n: int) -> float:
    return round(statistics.median(r[stage]["total"][key] for r in runs) / n, 1)


def summary(name: str, runs: list[dict], n: int) -> dict:
    out: dict = {"settings": runs[0]["settings"], "runs": len(runs)}
    for stage in ("settled", "after_query"):
        out[stage] = {f"{k}_bytes_per_series": per_series(runs, stage, k, n)
                      for k in ("pss", "rss", "shmem", "anon", "file")}
        out[stage]["settle_s"] = [r[stage]["settle_s"] for r in runs]
    out["ingest"] = [{k: r[k] for k in ("requests_ok", "requests_rejected", "first_error",
                                        "ingest_s")} for r in runs]
    out["query"] = [r["query"] for r in runs]
    mid = sorted(runs, key=lambda r: r["after_query"]["total"]["pss"])[len(runs) // 2]
    out["processes_after_query_median_run"] = [
        {"cmd": p["cmd"], **{f"{k}_bytes_per_series": round(p.get(k, 0) / n, 1)
                             for k in ("pss", "anon", "shmem")}}
        for p in mid["after_query"]["procs"]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3, help="samples per series, 15 s apart")
    ap.add_argument("--batch", type=int, default=2000, help="series per request")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", default="m3shm,victoria-metrics")
    ap.add_argument("--workers", type=int, default=2, help="m3shm workers")
    ap.add_argument("--shards", type=int, default=64, help="m3shm shards")
    ap.add_argument("--series-per-shard", type=int, default=0,
                    help="m3shm shm.series_per_shard (0 = the embedded default)")
    ap.add_argument("--arena-bytes", default="", help="m3shm shm.arena_bytes ('' = default)")
    ap.add_argument("--lane-bytes", default="", help="m3shm shm.lane_bytes ('' = default)")
    args = ap.parse_args()
    result: dict = {"series": args.series, "samples_per_series": args.rounds,
                    "series_per_request": args.batch, "connections": args.conns,
                    "series_per_host": nodegen.per_host(), "query": QUERY}
    for name in args.servers.split(","):
        runs = [one_run(name, args) for _ in range(args.runs)]
        result[name] = summary(name, runs, args.series)
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    vm = result.get("victoria-metrics")
    if "m3shm" in result and vm:
        for stage in ("settled", "after_query"):
            result[f"m3shm_over_vm_pss_{stage}"] = round(
                result["m3shm"][stage]["pss_bytes_per_series"] /
                vm[stage]["pss_bytes_per_series"], 3)
        result["target"] = "m3shm PSS per series <= 0.5 x VictoriaMetrics'"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
