"""node_exporter-like series for the perf scripts: realistic label sets, encoded straight to
remote write 1.0 protobuf bytes (no protobuf objects: building a million series with the
generated classes takes minutes).

A host exports ``len(host_series())`` series (about 560: CPU modes per core, filesystems,
network devices, disks, memory, vmstat, netstat, systemd units, collectors, Go runtime), each
labelled ``__name__``, ``instance``, ``job="node"`` and its metric's own labels, sorted by name
as Prometheus sends them. Series ``i`` is series ``i % per_host`` of host ``i // per_host``;
its value at round ``r`` is a counter-like or gauge-like function of (i, r), so compression
sees realistic deltas.
"""

from __future__ import annotations

import struct
from functools import cache

CPUS = 8
CPU_MODES = ("idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user")
MOUNTS = (("/dev/sda1", "ext4", "/"), ("/dev/sda2", "ext4", "/var"), ("/dev/sdb1", "xfs", "/data"),
          ("tmpfs", "tmpfs", "/run"), ("tmpfs", "tmpfs", "/dev/shm"), ("/dev/sda3", "ext4",
                                                                       "/boot"))
FS_METRICS = ("avail_bytes", "free_bytes", "size_bytes", "files", "files_free", "readonly",
              "device_error")
NET_DEVS = ("eth0", "eth1", "lo", "docker0")
NET_METRICS = ("receive_bytes_total", "transmit_bytes_total", "receive_packets_total",
               "transmit_packets_total", "receive_errs_total", "transmit_errs_total",
               "receive_drop_total", "transmit_drop_total", "up", "mtu_bytes", "speed_bytes")
DISKS = ("sda", "sdb", "nvme0n1", "dm-0")
DISK_METRICS = ("reads_completed_total", "writes_completed_total", "read_bytes_total",
                "written_bytes_total", "io_time_seconds_total", "read_time_seconds_total",
                "write_time_seconds_total", "io_now")
MEMORY = ("Active", "Active_anon", "Active_file", "AnonHugePages", "AnonPages", "Bounce",
          "Buffers", "Cached", "CommitLimit", "Committed_AS", "DirectMap1G", "DirectMap2M",
          "DirectMap4k", "Dirty", "HardwareCorrupted", "HugePages_Free", "HugePages_Rsvd",
          "HugePages_Surp", "HugePages_Total", "Hugepagesize", "Inactive", "Inactive_anon",
          "Inactive_file", "KernelStack", "Mapped", "MemAvailable", "MemFree", "MemTotal",
          "Mlocked", "NFS_Unstable", "PageTables", "SReclaimable", "SUnreclaim", "Shmem",
          "Slab", "SwapCached", "SwapFree", "SwapTotal", "Unevictable", "VmallocUsed")
VMSTAT = tuple(f"node_vmstat_{n}" for n in (
    "pgfault", "pgmajfault", "pgpgin", "pgpgout", "pswpin", "pswpout", "oom_kill",
    "nr_dirty", "nr_writeback", "nr_free_pages", "nr_inactive_anon", "nr_active_anon",
    "nr_inactive_file", "nr_active_file", "nr_unevictable", "nr_mlock", "nr_anon_pages",
    "nr_mapped", "nr_file_pages", "nr_shmem", "nr_slab_reclaimable", "nr_slab_unreclaimable",
    "nr_kernel_stack", "nr_page_table_pages", "pgsteal_kswapd", "pgsteal_direct",
    "pgscan_kswapd", "pgscan_direct", "workingset_refault", "workingset_activate"))
NETSTAT = tuple(f"node_netstat_{n}" for n in (
    "Icmp_InErrors", "Icmp_InMsgs", "Icmp_OutMsgs", "Icmp6_InErrors", "Icmp6_InMsgs",
    "Icmp6_OutMsgs", "IpExt_InOctets", "IpExt_OutOctets", "Ip_Forwarding", "Ip6_InOctets",
    "Ip6_OutOctets", "TcpExt_ListenDrops", "TcpExt_ListenOverflows", "TcpExt_SyncookiesFailed",
    "TcpExt_SyncookiesRecv", "TcpExt_SyncookiesSent", "TcpExt_TCPSynRetrans",
    "TcpExt_TCPTimeouts", "Tcp_ActiveOpens", "Tcp_CurrEstab", "Tcp_InErrs", "Tcp_InSegs",
    "Tcp_OutRsts", "Tcp_OutSegs", "Tcp_PassiveOpens", "Tcp_RetransSegs", "Udp_InDatagrams",
    "Udp_InErrors", "Udp_NoPorts", "Udp_OutDatagrams", "Udp_RcvbufErrors", "Udp_SndbufErrors",
    "UdpLite_InErrors", "Udp6_InDatagrams", "Udp6_InErrors", "Udp6_NoPorts",
    "Udp6_OutDatagrams", "Udp6_RcvbufErrors", "Udp6_SndbufErrors", "UdpLite6_InErrors"))
UNITS = tuple(f"{n}.service" for n in (
    "sshd", "cron", "rsyslog", "systemd-journald", "systemd-logind", "systemd-udevd", "dbus",
    "chrony", "containerd", "docker", "kubelet", "node_exporter", "nginx", "postgresql",
    "redis-server", "unattended-upgrades", "getty@tty1", "networking", "ufw", "polkit"))
UNIT_STATES = ("activating", "active", "deactivating", "failed", "inactive")
COLLECTORS = ("arp", "bcache", "bonding", "btrfs", "conntrack", "cpu", "cpufreq", "diskstats",
              "dmi", "edac", "entropy", "fibrechannel", "filefd", "filesystem", "hwmon",
              "infiniband", "ipvs", "loadavg", "mdadm", "meminfo", "netclass", "netdev",
              "netstat", "nfs", "nfsd", "nvme", "os", "powersupplyclass", "pressure", "rapl",
              "schedstat", "selinux", "sockstat", "softnet", "stat", "systemd", "tapestats",
              "textfile", "thermal_zone", "time")
SINGLES = ("node_load1", "node_load5", "node_load15", "node_boot_time_seconds",
           "node_time_seconds", "node_procs_running", "node_procs_blocked",
           "node_context_switches_total", "node_intr_total", "node_forks_total",
           "node_entropy_available_bits", "node_filefd_allocated", "node_filefd_maximum",
           "go_goroutines", "go_threads", "go_memstats_alloc_bytes",
           "go_memstats_alloc_bytes_total", "go_memstats_heap_alloc_bytes",
           "go_memstats_heap_idle_bytes", "go_memstats_heap_inuse_bytes",
           "go_memstats_heap_objects", "go_memstats_heap_released_bytes",
           "go_memstats_heap_sys_bytes", "go_memstats_mallocs_total",
           "go_memstats_frees_total", "go_memstats_gc_sys_bytes", "go_memstats_sys_bytes",
           "go_memstats_stack_inuse_bytes", "process_cpu_seconds_total",
           "process_max_fds", "process_open_fds", "process_resident_memory_bytes",
           "process_start_time_seconds", "process_virtual_memory_bytes", "up",
           "scrape_duration_seconds", "scrape_samples_scraped",
           "scrape_samples_post_metric_relabeling", "scrape_series_added")


@cache
def host_series() -> tuple[tuple[tuple[str, str], ...], ...]:
    """The label sets one host exports, without instance/job (name first, then its own)."""
    out: list[tuple[tuple[str, str], ...]] = []
    for c in range(CPUS):
        for m in CPU_MODES:
            out.append((("__name__", "node_cpu_seconds_total"), ("cpu", str(c)), ("mode", m)))
        for m in ("nice", "user"):
            out.append((("__name__", "node_cpu_guest_seconds_total"), ("cpu", str(c)),
                        ("mode", m)))
    for dev, fs, mp in MOUNTS:
        for m in FS_METRICS:
            out.append((("__name__", f"node_filesystem_{m}"), ("device", dev), ("fstype", fs),
                        ("mountpoint", mp)))
    for dev in NET_DEVS:
        for m in NET_METRICS:
            out.append((("__name__", f"node_network_{m}"), ("device", dev)))
    for dev in DISKS:
        for m in DISK_METRICS:
            out.append((("__name__", f"node_disk_{m}"), ("device", dev)))
    out += [(("__name__", f"node_memory_{m}_bytes"),) for m in MEMORY]
    out += [(("__name__", n),) for n in VMSTAT + NETSTAT + SINGLES]
    for u in UNITS:
        for s in UNIT_STATES:
            out.append((("__name__", "node_systemd_unit_state"), ("name", u), ("state", s)))
    for c in COLLECTORS:
        out.append((("__name__", "node_scrape_collector_duration_seconds"), ("collector", c)))
        out.append((("__name__", "node_scrape_collector_success"), ("collector", c)))
    for q in ("0", "0.25", "0.5", "0.75", "1"):
        out.append((("__name__", "go_gc_duration_seconds"), ("quantile", q)))
    for chip in ("platform_coretemp_0", "acpitz"):
        for k in range(4):
            out.append((("__name__", "node_hwmon_temp_celsius"), ("chip", chip),
                        ("sensor", f"temp{k + 1}")))
    return tuple(out)


def per_host() -> int:
    return len(host_series())


def instance(host: int) -> str:
    return f"node-{host:05d}.dc{host % 3}.example.net:9100"


def labels(i: int) -> list[tuple[str, str]]:
    """Label set of series ``i``, sorted by name."""
    h, k = divmod(i, per_host())
    own = host_series()[k]
    return sorted(own + (("instance", instance(h)), ("job", "node")))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def _labels_pb(pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(_field(0x0A, _field(0x0A, n.encode()) + _field(0x12, v.encode()))
                    for n, v in pairs)


@cache
def _parts(k: int) -> tuple[bytes, bytes]:
    """Host series k's own labels encoded: those sorting before "instance", those after "job"."""
    own = sorted(host_series()[k])
    return (_labels_pb([p for p in own if p[0] < "instance"]),
            _labels_pb([p for p in own if p[0] > "job"]))


def labels_pb(i: int) -> bytes:
    """The ``labels`` fields of series ``i``'s TimeSeries message (as labels(i), sorted)."""
    h, k = divmod(i, per_host())
    before, after = _parts(k)
    return before + _host_pb(h) + after


@cache
def _host_pb(h: int) -> bytes:
    return _labels_pb((("instance", instance(h)), ("job", "node")))


def value(i: int, r: int) -> float:
    """Series i's value at round r: counters grow by a per-series rate, gauges wander."""
    if i % 3:
        return float((i * 7919) % 100_000 + r * (1 + i % 13))
    return round(((i * 104729) % 1000) / 10 + (r % 7) * 0.25, 2)


def write_request(series: range, label_bytes: list[bytes], r: int, ts_ms: int) -> bytes:
    """An uncompressed remote write 1.0 body: every series of ``series`` (whose labels are
    ``label_bytes``, same order) with one sample of round ``r`` at ``ts_ms``."""
    tail = b"\x10" + _varint(ts_ms)
    head = b"\x12" + _varint(9 + len(tail)) + b"\x09"
    pack = struct.Struct("<d").pack
    out = []
    for i, lb in zip(series, label_bytes, strict=True):
        body = lb + head + pack(value(i, r)) + tail
        out.append(b"\x0a" + _varint(len(body)) + body)
    return b"".join(out)
