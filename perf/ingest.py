"""Remote-write ingest benchmark against any receiver (perf, not a test; not run in CI).

    python perf/ingest.py --target URL [--pid PID] [--hosts 253] [--rounds 30]
                          [--series-per-request 2000] [--connections 4]

Generates node_exporter-like series (376 per host: CPU modes per core, filesystems,
network devices, disks, memory, netstat, vmstat, collector timings, Go runtime; the default
253 hosts give 95,128 series), cut into remote write 1.0 requests of ``--series-per-request``
series with one sample each, as Prometheus sends them. Round r carries every series' sample
at t0 + 15 s x r; rounds go one after the other (a round's requests spread over
``--connections`` keep-alive connections), so every series is written in time order, as a
Prometheus remote-write queue does. 5xx/429 answers are retried after Retry-After, as
Prometheus does, and counted. All bodies are built and compressed before the clock starts.

Works the same against m3shm (``/api/v1/write``), VictoriaMetrics (``/api/v1/write``) and
Prometheus started with ``--web.enable-remote-write-receiver`` (``/api/v1/write``).

With ``--pid`` (the server's main process), the server's CPU (user+sys of the process and all
its descendants, from /proc/PID/stat, over the load plus ``--settle`` seconds) and its
memory (PSS from /proc/PID/smaps_rollup of every process, summed, so shared memory counts
once, read after the settle time) are reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import snappy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from m3shm.proto import remote_pb2  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
STEP_MS = 15_000


# -- the payload ------------------------------------------------------------------------------
def host_series(host: int) -> list[tuple[dict[str, str], bool]]:
    """One node_exporter's series: (labels, is_counter)."""
    inst = {"instance": f"node-{host:04d}.dc{host % 3}.example.net:9100", "job": "node"}
    out: list[tuple[dict[str, str], bool]] = []

    def add(name: str, counter: bool, **labels: str) -> None:
        out.append(({"__name__": name, **inst, **labels}, counter))

    for cpu in range(4):
        for mode in ("idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user"):
            add("node_cpu_seconds_total", True, cpu=str(cpu), mode=mode)
    for dev, mp, fs in (("/dev/sda1", "/", "ext4"), ("/dev/sda2", "/var", "ext4"),
                        ("/dev/sdb1", "/data", "xfs"), ("tmpfs", "/run", "tmpfs"),
                        ("tmpfs", "/dev/shm", "tmpfs")):
        for m in ("avail_bytes", "free_bytes", "size_bytes", "files", "files_free",
                  "readonly", "device_error"):
            add(f"node_filesystem_{m}", False, device=dev, fstype=fs, mountpoint=mp)
    for dev in ("eth0", "eth1", "lo", "docker0"):
        for d in ("receive", "transmit"):
            for m in ("bytes", "packets", "errs", "drop"):
                add(f"node_network_{d}_{m}_total", True, device=dev)
        add("node_network_up", False, device=dev)
        add("node_network_mtu_bytes", False, device=dev)
    for dev in ("sda", "sdb", "nvme0n1"):
        for m in ("reads_completed", "writes_completed", "read_bytes", "written_bytes",
                  "io_time_seconds", "read_time_seconds", "write_time_seconds",
                  "reads_merged", "writes_merged", "io_time_weighted_seconds"):
            add(f"node_disk_{m}_total", True, device=dev)
        add("node_disk_io_now", False, device=dev)
    for m in ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapCached",
              "Active", "Inactive", "Active_anon", "Inactive_anon", "Active_file",
              "Inactive_file", "Unevictable", "Mlocked", "SwapTotal", "SwapFree", "Dirty",
              "Writeback", "AnonPages", "Mapped", "Shmem", "KReclaimable", "Slab",
              "SReclaimable", "SUnreclaim", "KernelStack", "PageTables", "NFS_Unstable",
              "Bounce", "WritebackTmp", "CommitLimit", "Committed_AS", "VmallocTotal",
              "VmallocUsed", "VmallocChunk", "Percpu", "HardwareCorrupted", "AnonHugePages",
              "ShmemHugePages", "ShmemPmdMapped", "FileHugePages", "FilePmdMapped",
              "HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "HugePages_Surp",
              "Hugepagesize", "Hugetlb", "DirectMap4k", "DirectMap2M", "DirectMap1G"):
        add(f"node_memory_{m}_bytes", False)
    for m in ("load1", "load5", "load15", "boot_time_seconds", "time_seconds",
              "procs_running", "procs_blocked", "entropy_available_bits", "filefd_allocated",
              "filefd_maximum", "nf_conntrack_entries", "nf_conntrack_entries_limit",
              "timex_offset_seconds", "timex_sync_status", "sockstat_sockets_used",
              "sockstat_TCP_inuse", "sockstat_TCP_tw", "sockstat_UDP_inuse"):
        add(f"node_{m}", False)
    for m in ("context_switches_total", "forks_total", "intr_total"):
        add(f"node_{m}", True)
    for proto in ("Tcp", "Udp", "Icmp", "Ip", "TcpExt"):
        for m in ("InSegs", "OutSegs", "RetransSegs", "InErrors", "ActiveOpens",
                  "PassiveOpens", "CurrEstab"):
            add(f"node_netstat_{proto}_{m}", True)
    for m in ("pgfault", "pgmajfault", "pgpgin", "pgpgout", "pswpin", "pswpout",
              "oom_kill", "pgsteal_kswapd", "pgscan_direct", "numa_hit", "numa_miss",
              "thp_fault_alloc", "compact_stall", "workingset_refault", "nr_dirty"):
        add(f"node_vmstat_{m}", True)
    for c in ("arp", "bcache", "bonding", "btrfs", "conntrack", "cpu", "cpufreq", "diskstats",
              "dmi", "edac", "entropy", "fibrechannel", "filefd", "filesystem", "hwmon",
              "infiniband", "ipvs", "loadavg", "mdadm", "meminfo", "netclass", "netdev",
              "netstat", "nfs", "nfsd", "nvme", "os", "powersupplyclass", "pressure", "rapl",
              "schedstat", "selinux", "sockstat", "softnet", "stat", "tapestats",
              "textfile", "thermal_zone", "time", "timex", "udp_queues", "uname",
              "vmstat", "xfs", "zfs"):
        add("node_scrape_collector_duration_seconds", False, collector=c)
        add("node_scrape_collector_success", False, collector=c)
    for m in ("go_goroutines", "go_threads", "go_memstats_alloc_bytes",
              "go_memstats_heap_inuse_bytes", "go_memstats_heap_objects",
              "go_memstats_stack_inuse_bytes", "go_memstats_sys_bytes", "go_gc_duration_seconds",
              "process_resident_memory_bytes", "process_virtual_memory_bytes",
              "process_open_fds", "process_max_fds", "process_start_time_seconds",
              "promhttp_metric_handler_requests_in_flight"):
        add(m, False)
    for m in ("go_memstats_mallocs_total", "go_memstats_frees_total",
              "go_memstats_alloc_bytes_total", "process_cpu_seconds_total"):
        add(m, True)
    for code in ("200", "500", "503"):
        add("promhttp_metric_handler_requests_total", True, code=code)
    add("up", False)
    add("scrape_duration_seconds", False)
    add("scrape_samples_scraped", False)
    return out


def build_bodies(hosts: int, rounds: int, per_req: int, t0: int,
                 seed: int = 1) -> tuple[list[list[tuple[bytes, int]]], int]:
    """Bodies per round: [[(snappy body, samples), ...], ...] and the series count."""
    rnd = random.Random(seed)
    series = [s for h in range(hosts) for s in host_series(h)]
    reqs: list[tuple[remote_pb2.WriteRequest, list]] = []
    for lo in range(0, len(series), per_req):
        w = remote_pb2.WriteRequest()
        samples = []
        for labels, counter in series[lo:lo + per_req]:
            ts = w.timeseries.add()
            for k in sorted(labels):
                lab = ts.labels.add()
                lab.name, lab.value = k, labels[k]
            s = ts.samples.add()
            base = rnd.uniform(0, 1e6) if counter else rnd.uniform(0, 1e9)
            samples.append((s, counter, base, rnd.uniform(0, 1000)))
        reqs.append((w, samples))
    out = []
    for r in range(rounds):
        bodies = []
        for w, samples in reqs:
            for s, counter, base, rate in samples:
                s.timestamp = t0 + r * STEP_MS
                # counters grow by whole events (node_exporter's are mostly integers or
                # centiseconds); gauges wander around their level
                s.value = round(base + rate * r * 15, 2) if counter else \
                    round(base * (1 + 0.01 * rnd.random()))
            bodies.append((snappy.compress(w.SerializeToString()), len(samples)))
        out.append(bodies)
    return out, len(series)


# -- the server's processes -------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat ppid)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    """user+sys of the tree, plus what its reaped children used."""
    total = 0
    for i, p in enumerate(process_tree(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        if i == 0:
            total += int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def pss_bytes(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


# -- the load ---------------------------------------------------------------------------------
class Client(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.path = u.path + (f"?{u.query}" if u.query else "")
        self.work: list[tuple[bytes, int]] = []
        self.go = threading.Event()
        self.done = threading.Event()
        self.lat: list[float] = []
        self.ok = self.rejected = self.rejected_samples = self.retries = 0
        self.errors: dict[str, int] = {}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)

    def run(self) -> None:
        while True:
            self.go.wait()
            self.go.clear()
            for body, n in self.work:
                self._post(body, n)
            self.done.set()

    def _post(self, body: bytes, n: int) -> None:
        hdr = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
               "X-Prometheus-Remote-Write-Version": "0.1.0", "User-Agent": "m3shm-perf"}
        for attempt in range(30):
            t = time.perf_counter()
            try:
                self.conn.request("POST", self.path, body, hdr)
                resp = self.conn.getresponse()
                text = resp.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
                self.retries += 1
                time.sleep(0.1)
                continue
            self.lat.append(time.perf_counter() - t)
            if 200 <= resp.status < 300:
                self.ok += 1
                return
            if resp.status >= 500 or resp.status == 429:
                self.retries += 1
                time.sleep(float(resp.getheader("Retry-After") or 0.5) if attempt > 2 else 0.05)
                continue
            break
        else:
            text = b"retries exhausted"
        self.rejected += 1
        self.rejected_samples += n
        key = text.decode(errors="replace").strip().splitlines()[0][:160] if text else "?"
        self.errors[key] = self.errors.get(key, 0) + 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="remote write URL, e.g. "
                    "http://127.0.0.1:7201/api/v1/write")
    ap.add_argument("--pid", type=int, help="the server's main process (CPU and PSS)")
    ap.add_argument("--hosts", type=int, default=253,
                    help="376 series each (default 253: 95,128 series)")
    ap.add_argument("--rounds", type=int, default=30, help="samples per series (default 30)")
    ap.add_argument("--series-per-request", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds after the last answer still counted as the server's CPU")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.rounds * STEP_MS > 9 * 60_000:
        ap.error("--rounds: at most 36 (every sample must be within the last 9 minutes: "
                 "m3shm's default bufferPast is 10 minutes)")
    t0 = int(time.time() * 1000) - a.rounds * STEP_MS - 5_000
    rounds, nseries = build_bodies(a.hosts, a.rounds, a.series_per_request, t0, a.seed)
    clients = [Client(a.target) for _ in range(a.connections)]
    for c in clients:
        c.start()
    cpu0 = cpu_seconds(a.pid) if a.pid else 0.0
    start = time.perf_counter()
    for bodies in rounds:
        for i, c in enumerate(clients):
            c.work = bodies[i::len(clients)]
            c.done.clear()
            c.go.set()
        for c in clients:
            c.done.wait()
    seconds = time.perf_counter() - start
    out: dict[str, object] = {"target": a.target}
    if a.pid:
        time.sleep(a.settle)
        out["server_cpu_s"] = round(cpu_seconds(a.pid) - cpu0, 3)
    samples_sent = sum(n for bodies in rounds for _, n in bodies)
    rejected_samples = sum(c.rejected_samples for c in clients)
    samples = samples_sent - rejected_samples
    lat = sorted(x for c in clients for x in c.lat)
    errors: dict[str, int] = {}
    for c in clients:
        for k, v in c.errors.items():
            errors[k] = errors.get(k, 0) + v
    out.update({
        "series": nseries, "samples": samples, "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds),
        "requests": sum(len(b) for b in rounds), "rejected": sum(c.rejected for c in clients),
        "rejected_samples": rejected_samples, "retries": sum(c.retries for c in clients),
        "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
    })
    if a.pid:
        pss = pss_bytes(a.pid)
        out["server_cpu_s_per_million_samples"] = round(
            float(out["server_cpu_s"]) / samples * 1e6, 3) if samples else None  # type: ignore
        out["pss_bytes"] = pss
        out["pss_bytes_per_series"] = round(pss / nseries, 1)
    if errors:
        out["errors"] = errors
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
