# Invariants:
# * Every scenario is bounded in time and connection count and stops by itself; by default it
#   starts its own relay on 127.0.0.1 with a fresh temporary data directory (removed at the
#   end) and only ever connects to loopback. --url points it at a running relay instead.
# * Load comes from worker processes (bench/_relay_load_worker.py), never from this process's
#   event loop, so the figures are the relay's and not the orchestrator's.
# * Each scenario prints its figures, the target and "ok" or "MISSED"; the exit status is 0
#   even when a target is missed (this is a measurement, not a test).
"""Relay load tool: throughput, latency, idle-connection memory and group fan-out.

Examples (the commands behind docs/performance-relay.md)::

    python bench/relay_load.py throughput --rate 11000 --duration 20
    python bench/relay_load.py latency --rate 5000 --duration 20
    python bench/relay_load.py idle-connections --connections 19900
    python bench/relay_load.py idle-connections --connections 19900 --frame-auth
    python bench/relay_load.py --store postgres --nodes 2 idle-connections --connections 20400
    python bench/relay_load.py group-fanout --recipients 1000 --messages 50
    python bench/relay_load.py --store postgres throughput --rate 6000 --duration 20
    python bench/relay_load.py --store both throughput --rate 6000 --duration 20

With ``--store postgres`` the started relay runs on PostgreSQL (``--postgres-dsn``, default the
local server): each run gets a database of its own (``blindpost_bench_<random>``, dropped at the
end), and the figures add the CPU of the PostgreSQL backends serving the relay. ``--store both``
runs the scenario on SQLite, then on PostgreSQL, and prints the relay CPU per message of each and
their ratio (issue 14's target: PostgreSQL at most 1.5x SQLite's, >= 5,000 durable msg/s).

With ``--nodes N`` (``--store postgres`` only) it starts N relay nodes on that database and one
Redis (``--redis-url``, default the local server, under a fresh key prefix that is deleted at the
end), each on a port of its own, and spreads the load processes over them: the way one host
uses more cores and holds more sockets than one process's file limit allows. Figures (CPU, RSS,
connections) are then summed over the nodes, per node as well where it matters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
from _relay_load_worker import device_signer, raise_fd_limit  # noqa: E402

from e2ee.transport.auth import DeviceSigner  # noqa: E402
from e2ee.transport.frames import encode_send  # noqa: E402

WORKER = ROOT / "bench" / "_relay_load_worker.py"

# Settings the bench relay needs: registrations of thousands of devices from one IP (without
# a proof of work each: registration is not what is measured), no sender share smaller than
# a mailbox, and no per-access log lines (at INFO the relay logs every request and WebSocket
# open/close).
BENCH_SETTINGS = {
    "registration": "open",
    "mailbox_sender_max_messages": "10000",
    "mailbox_stranger_max_messages": "10000",
    "registration_rate": "1000000",
    "registration_burst": "1000000",
    "send_rate": "1000000",
    "send_burst": "1000000",
    "account_send_rate": "1000000",
    "account_send_burst": "1000000",
    "account_max_inflight_sends": "1000000",
    "log_level": "WARNING",
}

TARGETS = {
    "throughput_msgs": 10_000.0,
    "throughput_msgs_postgres": 5_000.0,  # one node on PostgreSQL (issue 14)
    "latency_p99_ms": 10.0,
    "idle_bytes_per_conn": 16 * 1024,
    "idle_connections": 20_000,
    "fanout_ms": 50.0,
}


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# -- relay process ---------------------------------------------------------------------------


@dataclass
class Relay:
    url: str
    pid: int | None
    proc: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    postgres_dsn: str | None = None  # with --store postgres: the run's database
    nodes: list[Relay] = field(default_factory=list)  # with --nodes N: every node, this first

    @property
    def urls(self) -> list[str]:
        """Every node's URL (this relay's alone without --nodes)."""
        return [node.url for node in self.nodes] or [self.url]

    def postgres_cpu_seconds(self) -> float | None:
        """CPU of the PostgreSQL backends serving this relay (``--store postgres`` only)."""
        return None if self.postgres_dsn is None else postgres_backend_cpu(self.postgres_dsn)

    def processes(self) -> list[int]:
        """The relay's processes: every node's with --nodes N, else its own."""
        if self.nodes:
            return [pid for node in self.nodes for pid in node.processes()]
        return [self.pid] if self.pid else []

    def rss_kb(self) -> int | None:
        """VmRSS summed over the relay's processes."""
        per = self.rss_by_process()
        return sum(per.values()) if per else None

    def rss_by_process(self) -> dict[int, int]:
        out = {}
        for pid in self.processes():
            rss = read_status(pid, "VmRSS")
            if rss is not None:
                out[pid] = rss
        return out

    def cpu_seconds(self) -> float | None:
        """CPU of the relay's processes (every node's with --nodes N)."""
        pids = self.processes()
        if not pids:
            return None
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def threads(self) -> dict[str, float]:
        """Per kind of thread, summed over the relay's processes: CPU seconds (user, system)
        and context switches. ``loop`` is each process's main thread (the event loop),
        ``other`` every other thread; ``writer`` and ``sync`` (the SQLite writer and the log's
        sync thread, by the names relay.threadnames gives the kernel) are part of ``other``."""
        out = {
            f"{kind}_{what}": 0.0
            for kind in ("loop", "other", "writer", "sync")
            for what in ("user", "sys", "cs")
        }
        tick = os.sysconf("SC_CLK_TCK")
        named = {"relay-writer": "writer", "relay-sync": "sync"}
        for pid in self.processes():
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    base = f"/proc/{pid}/task/{tid}"
                    with contextlib.suppress(OSError):
                        fields = Path(f"{base}/stat").read_text().rsplit(")", 1)[1].split()
                        status = Path(f"{base}/status").read_text().splitlines()
                        comm = Path(f"{base}/comm").read_text().strip()
                        kinds = ["loop"] if int(tid) == pid else ["other"]
                        if comm in named:
                            kinds.append(named[comm])
                        cs = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
                        for kind in kinds:
                            out[f"{kind}_user"] += int(fields[11]) / tick
                            out[f"{kind}_sys"] += int(fields[12]) / tick
                            out[f"{kind}_cs"] += cs
        return out

    def tracebacks(self) -> int:
        if self.nodes:
            return sum(node.tracebacks() for node in self.nodes)
        if self.log_path is None or not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("Traceback")


def read_status(pid: int, key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (bench/peer_ejabberd.py counts an Erlang node's helpers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return sorted(out)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _raise_child_fd_limit() -> None:  # runs in the relay child between fork and exec
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def relay_process(
    settings: dict[str, str],
    keep: bool = False,
    extra_settings: dict[str, str] | None = None,
    env_extra: dict[str, str] | None = None,
) -> Iterator[Relay]:
    """Start ``python -m relay`` on 127.0.0.1 with a fresh data dir; stop it afterwards."""
    extra_settings = extra_settings or {}
    data_dir = Path(tempfile.mkdtemp(prefix="blindpost-load-"))
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "relay",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data",
        str(data_dir / "relay"),
    ]
    for k, v in {**BENCH_SETTINGS, **settings, **extra_settings}.items():
        args += ["--set", f"{k}={v}"]
    log_path = data_dir / "relay.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_RELAY_")}
    env.update(env_extra or {})  # the PostgreSQL DSN goes here, never on the command line
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_raise_child_fd_limit,
        )
    relay = Relay(f"http://127.0.0.1:{port}", proc.pid, proc, data_dir, log_path)
    try:
        wait_for_port(proc, port, 20, "relay", log_path)
        yield relay
    finally:
        stop_process(proc)
        tb = relay.tracebacks()
        if tb:
            print(f"relay log has {tb} Traceback(s): see {log_path}")
            keep = True
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def wait_for_port(
    proc: subprocess.Popen[bytes], port: int, seconds: float, what: str, log: Path | None = None
) -> None:
    """Wait until ``proc`` accepts connections on 127.0.0.1:``port``.

    Raises:
        RuntimeError: it exited (with ``log``'s text, if given) or did not listen in time.
    """
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited" + (":\n" + log.read_text() if log else ""))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {seconds:.0f} s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; wait for the exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _in_own_loop(coro: Any) -> Any:
    """Run a coroutine on a fresh loop in a thread (callers may be inside the main loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def bench_database(server_dsn: str) -> Iterator[str]:
    """An empty database ``blindpost_bench_<random>`` on ``server_dsn``, dropped afterwards."""
    import asyncpg

    name = "blindpost_bench_" + secrets.token_hex(6)

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(server_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _in_own_loop(run(f'CREATE DATABASE "{name}"'))
    try:
        yield urlunsplit(urlsplit(server_dsn)._replace(path="/" + name))
    finally:
        _in_own_loop(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def postgres_backend_cpu(dsn: str) -> float | None:
    """CPU seconds of the PostgreSQL backends serving the relay on ``dsn``'s database (None when
    they are not readable here: the server runs elsewhere or as another user without access)."""
    import asyncpg

    async def pids() -> list[int]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'blindpost-relay'"
            )
            return [int(r[0]) for r in rows]
        finally:
            await conn.close()

    total, seen = 0.0, False
    for pid in _in_own_loop(pids()):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            seen = True
    return total if seen else None


@contextlib.contextmanager
def target_relay(args: argparse.Namespace, settings: dict[str, str]) -> Iterator[Relay]:
    if args.url:
        yield Relay(args.url.rstrip("/"), args.relay_pid)
        return
    extra = dict(item.split("=", 1) for item in args.relay_set)
    if args.nodes > 1:
        with relay_nodes(args, settings, extra) as relay:
            yield relay
        return
    if args.store != "postgres":
        with relay_process(settings, keep=args.keep, extra_settings=extra) as relay:
            yield relay
        return
    with bench_database(args.postgres_dsn) as dsn:
        env = {"BLINDPOST_RELAY_POSTGRES_DSN": dsn}
        extra = {"store": "postgres", **extra}
        with relay_process(settings, keep=args.keep, extra_settings=extra, env_extra=env) as relay:
            relay.postgres_dsn = dsn
            yield relay


@contextlib.contextmanager
def relay_nodes(
    args: argparse.Namespace, settings: dict[str, str], extra: dict[str, str]
) -> Iterator[Relay]:
    """``args.nodes`` relay nodes on one fresh PostgreSQL database and one Redis prefix, each on
    a port of its own (docs/architecture.md, "One scale-out design: relay nodes")."""
    prefix = f"blindpost-bench-{secrets.token_hex(4)}:"
    with bench_database(args.postgres_dsn) as dsn, contextlib.ExitStack() as stack:
        # Secrets by environment, never on the command line.
        env = {"BLINDPOST_RELAY_POSTGRES_DSN": dsn, "BLINDPOST_RELAY_REDIS_URL": args.redis_url}
        node_settings = {"store": "postgres", "redis_prefix": prefix, **extra}
        stack.callback(_in_own_loop, _delete_redis_keys(args.redis_url, prefix))
        nodes = [
            stack.enter_context(
                relay_process(settings, keep=args.keep, extra_settings=node_settings, env_extra=env)
            )
            for _ in range(args.nodes)
        ]
        relay = Relay(nodes[0].url, None, postgres_dsn=dsn, nodes=nodes)
        print(f"  {args.nodes} relay nodes on PostgreSQL + Redis: {', '.join(relay.urls)}")
        yield relay


async def _delete_redis_keys(url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    try:
        keys = [key async for key in redis.scan_iter(match=prefix + "*", count=1000)]
        for i in range(0, len(keys), 1000):
            await redis.delete(*keys[i : i + 1000])
    finally:
        await redis.aclose()


# -- registration ----------------------------------------------------------------------------


async def register_devices(
    url: str, seed: str, prefix: str, count: int, concurrency: int = 32
) -> None:
    """Register users ``<prefix>0 .. <prefix><count-1>`` (device 1 each)."""
    sem = asyncio.Semaphore(concurrency)
    failures: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            signer = device_signer(seed, prefix, i)
            body = json.dumps(
                {"username": signer.user, "device_id": 1, "auth_key": signer.public_key_b64}
            ).encode()
            async with sem:  # signed once its turn comes: a queued request would go stale
                headers = signer.sign_headers("POST", "/v1/accounts", body)
                headers["Content-Type"] = "application/json"
                async with session.post(url + "/v1/accounts", data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 201:
                        failures[resp.status] += 1

        t = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(count)))
    if failures:
        raise RuntimeError(f"registration failed: {dict(failures)}")
    dt = time.monotonic() - t
    print(f"  registered {count} devices in {dt:.1f} s ({count / dt:.0f}/s)")


# -- workers ---------------------------------------------------------------------------------


class Worker:
    """A load-generator subprocess driven over JSON lines (``script``: which worker)."""

    script: Path = WORKER

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, cfg: dict[str, Any]) -> Self:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(cls.script),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 30,
            cwd=ROOT,
        )
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(cfg) + "\n").encode())
        await proc.stdin.drain()
        return cls(proc)

    async def event(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker exited ({await self.proc.wait()})")
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((text + "\n").encode())
        await self.proc.stdin.drain()

    async def finish(self, timeout: float = 60) -> None:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def split(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


def source_addrs(count: int) -> list[str]:
    """127.0.0.2 .. : distinct source addresses, so 20k+ sockets never exhaust the ports of one."""
    return [f"127.0.0.{2 + i}" for i in range(count)]


async def start_workers(cfgs: Sequence[dict[str, Any]], ready_timeout: float) -> list[Worker]:
    workers = [await Worker.start(cfg) for cfg in cfgs]
    readies = await asyncio.gather(*(w.event(ready_timeout) for w in workers))
    connected = sum(r["connected"] for r in readies)
    failed: Counter[str] = Counter()
    for r in readies:
        failed.update(r["failed"])
    print(
        f"  workers ready: {connected} WebSockets open"
        + (f", failed {dict(failed)}" if failed else "")
    )
    return workers


def pct(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[k])


# -- scenarios -------------------------------------------------------------------------------


async def start_traffic(
    args: argparse.Namespace,
    urls: list[str],
    seed: str,
    prefix: str,
    extra: dict[str, Any],
) -> tuple[list[Any], int]:
    """Start the 1:1 traffic workers (``args.clients`` peers over ``args.workers`` processes,
    taking turns over ``urls``) and give them one start time; return them and that time (ns).

    ``extra`` adds worker settings (``ack``, ``sample_seconds``).
    """
    base = {
        "seed": seed,
        "prefix": prefix,
        "mode": "traffic",
        "peers": args.clients,
        "warmup": args.warmup,
        "duration": args.duration,
        "body_bytes": args.body_bytes,
        "drain": args.drain,
        **extra,
    }
    cfgs = [
        {
            **base,
            "url": urls[i % len(urls)],
            "indices": list(r),
            "rate": args.rate * (r[1] - r[0]) / args.clients,
            "source_addrs": source_addrs(1),
        }
        for i, r in enumerate(split(args.clients, args.workers))
    ]
    workers = await start_workers(cfgs, 120)
    t0 = time.monotonic_ns() + 500_000_000
    for w in workers:
        await w.command(f"go {t0}")
    return workers, t0


async def traffic_scenario(args: argparse.Namespace, name: str) -> dict[str, Any]:
    seed, prefix = secrets.token_hex(8), f"lt{secrets.token_hex(3)}_"
    with target_relay(args, {}) as relay:
        await register_devices(relay.url, seed, prefix, args.clients)
        workers, _ = await start_traffic(
            args, relay.urls, seed, prefix, {"ack": not args.no_ack, "settle": not args.no_settle}
        )
        # The relay's CPU share is sampled over the measured window only.
        await asyncio.sleep(0.5 + args.warmup)
        cpu_w0 = relay.cpu_seconds()
        threads_w0 = relay.threads()
        pg_w0 = relay.postgres_cpu_seconds()
        commits_w0 = await store_commits(relay.url)
        await asyncio.sleep(args.duration)
        cpu_w1 = relay.cpu_seconds()
        threads_w1 = relay.threads()
        pg_w1 = relay.postgres_cpu_seconds()
        commits_w1 = await store_commits(relay.url)
        total = args.warmup + args.duration + args.drain + 60
        results = await asyncio.gather(*(w.event(total) for w in workers))
        for w in workers:
            await w.finish()
        rss = relay.rss_kb()
    agg: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    lat: list[int] = []
    answer_lat: list[int] = []
    worker_cpu = 0.0
    for r in results:
        for key in (
            "sent_in_window",
            "accepted_in_window",
            "delivered_in_window",
            "sent",
            "accepted",
            "delivered",
            "unanswered_sends",
        ):
            agg[key] += r[key]
        statuses.update(r["results"])
        closes.update(r["closes"])
        lat.extend(r["latencies_us"])
        answer_lat.extend(r.get("answer_latencies_us", ()))
        worker_cpu += r["cpu_seconds"]
    lat.sort()
    answer_lat.sort()
    d = args.duration
    accepted = max(1, agg["accepted_in_window"])  # a divisor: never 0
    pg_us = 1e6 * (pg_w1 - pg_w0) / accepted if pg_w0 is not None and pg_w1 is not None else None
    threads = {k: threads_w1[k] - threads_w0[k] for k in threads_w0}
    out = {
        "scenario": name,
        "store": "url" if args.url else args.store,
        "offered_msgs_per_s": args.rate,
        "clients": args.clients,
        "accepted_per_s": agg["accepted_in_window"] / d,
        "delivered_per_s": agg["delivered_in_window"] / d,
        "sent_in_window": agg["sent_in_window"],
        "accepted_in_window": agg["accepted_in_window"],
        "delivered_in_window": agg["delivered_in_window"],
        "lost_in_window": agg["accepted_in_window"] - agg["delivered_in_window"],
        "send_results": dict(statuses),
        "unanswered_sends": agg["unanswered_sends"],
        "overflow_4002_closes": closes.get("4002", 0),
        "mailbox_full_507": statuses.get("507", 0),
        "closes": dict(closes),
        "p50_ms": pct(lat, 50) / 1000,
        "p99_ms": pct(lat, 99) / 1000,
        "max_ms": (lat[-1] / 1000) if lat else float("nan"),
        # send -> 200: the sender's wait for the durable commit (and its sync)
        "answer_p50_ms": pct(answer_lat, 50) / 1000,
        "answer_p99_ms": pct(answer_lat, 99) / 1000,
        "relay_cpu_pct": (
            (100 * (cpu_w1 - cpu_w0) / d) if cpu_w0 is not None and cpu_w1 is not None else None
        ),
        "workers_cpu_pct": 100 * worker_cpu / (args.warmup + d + args.drain),
        "relay_cpu_us_per_msg": (
            1e6 * (cpu_w1 - cpu_w0) / accepted
            if cpu_w0 is not None and cpu_w1 is not None
            else None
        ),
        "postgres_cpu_us_per_msg": pg_us,
        # Per kind of thread over the window: % of one core, and context switches a message.
        "threads_pct": {k: 100 * v / d for k, v in threads.items() if not k.endswith("_cs")},
        "context_switches_per_msg": {
            k.removesuffix("_cs"): v / accepted for k, v in threads.items() if k.endswith("_cs")
        },
        "loadavg_1min": os.getloadavg()[0],
        "relay_rss_mb_after": (rss / 1024) if rss else None,
        "store_commits_per_s": (commits_w1[0] - commits_w0[0]) / d,
        "store_ops_per_commit": (commits_w1[1] - commits_w0[1])
        / max(1.0, commits_w1[0] - commits_w0[0]),
        "store_loop_staged_pct": 100
        * (commits_w1[2] - commits_w0[2])
        / max(1.0, commits_w1[3] - commits_w0[3]),
    }
    print(
        f"== {name} ({out['store']}): {args.clients} clients, 1:1, {args.body_bytes}-byte bodies,"
        " offered "
        f"{args.rate:.0f} msg/s for {d:.0f} s (+{args.warmup:.0f} s warm-up)"
    )
    print(
        f"  accepted  {out['accepted_per_s']:9.0f} msg/s   delivered {out['delivered_per_s']:9.0f}"
        f" msg/s   (sent {agg['sent_in_window']}, accepted {agg['accepted_in_window']},"
        f" delivered {agg['delivered_in_window']} in window)"
    )
    print(
        f"  send-to-deliver latency  p50 {out['p50_ms']:.2f} ms  p99 {out['p99_ms']:.2f} ms"
        f"  max {out['max_ms']:.2f} ms"
    )
    print(
        f"  send-to-200 (durable answer)  p50 {out['answer_p50_ms']:.2f} ms"
        f"  p99 {out['answer_p99_ms']:.2f} ms"
    )
    print(
        f"  send_result statuses {dict(statuses)}; unanswered sends {agg['unanswered_sends']};"
        f" 4002 closes {out['overflow_4002_closes']}; 507s {out['mailbox_full_507']};"
        f" closes {dict(closes)}"
    )
    if out["relay_cpu_pct"] is not None:
        print(
            f"  relay CPU {out['relay_cpu_pct']:.0f}% of one core"
            f" ({out['relay_cpu_us_per_msg']:.0f} us per accepted message incl. its delivery"
            f" and ack); load workers {out['workers_cpu_pct']:.0f}%; machine load average"
            f" {out['loadavg_1min']:.1f}"
        )
    if out["relay_cpu_pct"] is not None:
        tp, cs = out["threads_pct"], out["context_switches_per_msg"]
        print(
            f"  relay threads: event loop {tp['loop_user']:.1f}% user + {tp['loop_sys']:.1f}%"
            f" system, other threads {tp['other_user']:.1f}% + {tp['other_sys']:.1f}% (SQLite"
            f" writer {tp['writer_user']:.1f}% + {tp['writer_sys']:.1f}%, log sync"
            f" {tp['sync_user']:.1f}% + {tp['sync_sys']:.1f}%); context switches"
            f" {cs['loop'] + cs['other']:.2f} a message (loop {cs['loop']:.2f}, writer"
            f" {cs['writer']:.2f}, sync {cs['sync']:.2f})"
        )
    if pg_us is not None:
        print(f"  PostgreSQL backends serving the relay: {pg_us:.0f} us CPU per accepted message")
    print(
        f"  store: {out['store_commits_per_s']:.0f} commits/s, {out['store_ops_per_commit']:.1f}"
        " write operations (sends, acks) per commit, sends staged by the event loop"
        f" {out['store_loop_staged_pct']:.0f}% (from /metrics; node 0's with --nodes N)"
    )
    if name == "throughput":
        key = "throughput_msgs_postgres" if out["store"] == "postgres" else "throughput_msgs"
        target = TARGETS[key]
        ok = out["accepted_per_s"] >= target and out["delivered_per_s"] >= target
        print(f"  target: >= {target:.0f} durable msg/s accepted and delivered -> {verdict(ok)}")
    else:
        ok = (
            out["p99_ms"] <= TARGETS["latency_p99_ms"] and out["accepted_per_s"] >= 0.99 * args.rate
        )
        print(
            f"  target: p99 <= {TARGETS['latency_p99_ms']:.0f} ms at {args.rate:.0f} msg/s"
            f" (all offered load accepted) -> {verdict(ok)}"
        )
    out["ok"] = ok
    return out


async def idle_scenario(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    seed, prefix = secrets.token_hex(8), f"li{secrets.token_hex(3)}_"
    n = args.connections
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if n + 64 > soft:
        print(f"  note: RLIMIT_NOFILE hard limit is {soft}; the relay needs one fd per socket")
    with target_relay(args, {}) as relay:
        urls = relay.urls
        warm = min(200, n)
        await register_devices(relay.url, seed, prefix, n + warm)
        # Warm-up: open and close a few connections on every node so code paths, caches and
        # allocator arenas that every connection shares are already paid for in "before".
        ws_warm = await start_workers(
            [
                {
                    "url": url,
                    "seed": seed,
                    "prefix": prefix,
                    "mode": "idle",
                    "indices": [n + a, n + b],
                    "frame_auth": args.frame_auth,
                    "source_addrs": source_addrs(1),
                }
                for url, (a, b) in zip(urls, split(warm, len(urls)), strict=True)
            ],
            120,
        )
        for w in ws_warm:
            await w.command("close")
            await w.event(60)
            await w.finish()
        await asyncio.sleep(1.0)
        before_by = relay.rss_by_process()
        before = sum(before_by.values()) if before_by else None
        ranges = split(n, max(args.workers, len(urls)))
        addrs = source_addrs(args.source_addrs)
        cfgs = [
            {
                "url": urls[i % len(urls)],
                "seed": seed,
                "prefix": prefix,
                "mode": "idle",
                "indices": list(r),
                "connect_concurrency": 100,
                "source_addrs": addrs[i :: len(ranges)] or addrs,
                "frame_auth": args.frame_auth,
            }
            for i, r in enumerate(ranges)
        ]
        t = time.monotonic()
        workers = await start_workers(cfgs, args.connect_timeout)
        dt = time.monotonic() - t
        await asyncio.sleep(args.settle)
        after_by = relay.rss_by_process()
        after = sum(after_by.values()) if after_by else None
        per_node = {
            url: _metric(await fetch_text(url + "/metrics"), "blindpost_relay_ws_connections")
            for url in urls
        }
        for w in workers:
            await w.command("close")
        results = await asyncio.gather(*(w.event(120) for w in workers))
        for w in workers:
            await w.finish()
    live = sum(per_node.values())  # each node answers /metrics for itself
    closes: Counter[str] = Counter()
    for r in results:
        closes.update(r["closes"])
    out: dict[str, Any] = {
        "scenario": "idle-connections",
        "connections": live,
        "open_seconds": dt,
        "rss_before_kb": before,
        "rss_after_kb": after,
    }
    print(
        f"== idle-connections: {n} authenticated WebSockets requested, relay reports {live:.0f}"
        f" open (opened in {dt:.1f} s)"
    )
    if len(per_node) > 1:
        out["per_node_connections"] = per_node
        out["per_process_rss_kb"] = {p: (before_by.get(p), after_by[p]) for p in after_by}
        print(f"  connections per node (from each node's /metrics): {per_node}")
        for p in sorted(after_by):
            b = before_by.get(p)
            print(f"  node pid {p}: VmRSS {(b or 0) / 1024:.1f} MB -> {after_by[p] / 1024:.1f} MB")
    if before and after and live:
        per = (after - before) * 1024 / live
        out["bytes_per_conn"] = per
        print(
            f"  relay VmRSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB after {args.settle:.0f}"
            f" s: {per / 1024:.2f} KB per idle authenticated WebSocket"
            + (f" (summed over {len(after_by)} nodes)" if len(after_by) > 1 else "")
        )
        ok = per <= TARGETS["idle_bytes_per_conn"] and live >= TARGETS["idle_connections"]
        print(
            f"  target: <= 16 KB per idle WebSocket at >= {TARGETS['idle_connections']}"
            f" connections -> {verdict(ok)}"
            + (
                ""
                if live >= TARGETS["idle_connections"]
                else f" (only {live:.0f} connections; per-connection memory "
                f"{verdict(per <= TARGETS['idle_bytes_per_conn'])})"
            )
        )
        out["ok"] = ok
    else:
        print("  relay RSS unavailable (pass --relay-pid with --url)")
    if closes:
        print(f"  closes seen by clients before shutdown: {dict(closes)}")
    return out


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def store_commits(url: str) -> tuple[float, float, float, float]:
    """(commits, operations committed, sends staged by the event loop, messages accepted) so
    far, from ``/metrics`` (zeros if not exported)."""
    text = await fetch_text(url + "/metrics")
    return (
        _metric(text, "blindpost_relay_store_commits_total"),
        _metric(text, "blindpost_relay_store_committed_ops_total"),
        _metric(text, "blindpost_relay_store_loop_staged_total"),
        _metric(text, "blindpost_relay_messages_accepted_total"),
    )


async def fetch_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


async def fanout_scenario(args: argparse.Namespace) -> dict[str, Any]:
    seed, prefix = secrets.token_hex(8), f"lf{secrets.token_hex(3)}_"
    n = args.recipients
    with target_relay(args, {"max_recipients": str(max(2000, n))}) as relay:
        await register_devices(relay.url, seed, prefix, n + 1)
        workers = []
        if not args.offline:
            urls = relay.urls
            cfgs = [
                {
                    "url": urls[i % len(urls)],
                    "seed": seed,
                    "prefix": prefix,
                    "mode": "recipients",
                    "indices": [1 + a, 1 + b],
                    "source_addrs": source_addrs(1),
                }
                for i, (a, b) in enumerate(split(n, args.workers))
            ]
            workers = await start_workers(cfgs, 120)
        sender = device_signer(seed, prefix, 0)
        recipients = [(f"{prefix}{i}", 1) for i in range(1, n + 1)]
        accept_ms = await send_group(relay.url, sender, recipients, args)
        await asyncio.sleep(1.0)
        for w in workers:
            await w.command("close")
        results = await asyncio.gather(*(w.event(60) for w in workers))
        for w in workers:
            await w.finish()
    per_msg: dict[int, list[int]] = {}
    for r in results:
        for t, count, mx in r["fanout"]:
            e = per_msg.setdefault(t, [0, 0])
            e[0] += count
            e[1] = max(e[1], mx)
    accept_ms.sort()
    out: dict[str, Any] = {
        "scenario": "group-fanout",
        "recipients": n,
        "messages": len(accept_ms),
        "p50_ms": pct(accept_ms, 50),
        "p99_ms": pct(accept_ms, 99),
        "max_ms": accept_ms[-1],
    }
    print(
        f"== group-fanout: {len(accept_ms)} messages, each to {n} recipient devices"
        f" ({'offline' if args.offline else 'all connected live'}), sent one at a time"
    )
    print(
        f"  send -> send_result 200: p50 {out['p50_ms']:.1f} ms  p99 {out['p99_ms']:.1f} ms"
        f"  max {out['max_ms']:.1f} ms"
    )
    if per_msg:
        full = sum(1 for c, _ in per_msg.values() if c == n)
        last = sorted(mx / 1000 for _, mx in per_msg.values())
        out["last_delivery_p50_ms"] = pct(last, 50)
        out["last_delivery_max_ms"] = last[-1]
        print(
            f"  delivered to all {n}: {full}/{len(per_msg)} messages; send -> last recipient"
            f" p50 {out['last_delivery_p50_ms']:.1f} ms  max {last[-1]:.1f} ms"
        )
    ok = out["p99_ms"] <= TARGETS["fanout_ms"]
    print(
        f"  target: accepted in <= {TARGETS['fanout_ms']:.0f} ms (judged on p99) -> {verdict(ok)}"
    )
    out["ok"] = ok
    return out


async def send_group(
    url: str, sender: DeviceSigner, recipients: list[tuple[str, int]], args: argparse.Namespace
) -> list[float]:
    times: list[float] = []
    pad = b"G" + b"\x00" * max(0, args.body_bytes - 9)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url + "/v1/ws", headers=sender.sign_headers("GET", "/v1/ws"))
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data == '{"type":"empty"}':
                break
        for _ in range(args.messages):
            t = time.monotonic_ns()
            frame = encode_send(os.urandom(16), recipients, t.to_bytes(8, "big") + pad)
            await ws.send_bytes(frame)
            while True:
                msg = await ws.receive(timeout=30)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"sender socket: {msg}")
                doc = json.loads(msg.data)
                if doc.get("type") == "send_result":
                    break
            if doc.get("status") != 200:
                raise RuntimeError(f"group send failed: {doc}")
            times.append((time.monotonic_ns() - t) / 1e6)
            await asyncio.sleep(args.pause)
        await ws.close()
    return times


# -- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="target a running relay instead of starting one (loopback!)")
    p.add_argument("--relay-pid", type=int, help="with --url: the relay's pid, for RSS and CPU")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and log")
    p.add_argument(
        "--relay-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the started relay, e.g. write_batch_max=500 (repeatable)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="start this many relay nodes on PostgreSQL + Redis (needs --store postgres), each"
        " on its own port; the load processes take turns over them",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("BLINDPOST_BENCH_REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="Redis for --nodes (keys under a fresh prefix, deleted at the end)",
    )
    p.add_argument(
        "--store",
        choices=("sqlite", "postgres", "both"),
        default="sqlite",
        help="the started relay's store; both = the scenario on each, then the CPU ratio",
    )
    p.add_argument(
        "--postgres-dsn",
        default=os.environ.get("BLINDPOST_BENCH_POSTGRES_DSN")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server for --store postgres (a database is created and dropped on it)",
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    sub = p.add_subparsers(dest="scenario", required=True)

    def traffic_args(sp: argparse.ArgumentParser, rate: float) -> None:
        sp.add_argument("--rate", type=float, default=rate, help="offered messages/s (total)")
        sp.add_argument("--duration", type=float, default=20.0, help="measured seconds")
        sp.add_argument("--warmup", type=float, default=3.0)
        sp.add_argument("--drain", type=float, default=3.0, help="seconds to wait for stragglers")
        sp.add_argument(
            "--clients", type=int, default=200, help="devices (each sends and receives)"
        )
        sp.add_argument("--workers", type=int, default=2, help="load-generator processes")
        sp.add_argument("--body-bytes", type=int, default=200)
        sp.add_argument("--no-ack", action="store_true", help="receivers do not ack")
        sp.add_argument(
            "--no-settle",
            action="store_true",
            help="senders do not settle their accepted sends (the relay keeps their dedupe "
            "records for dedupe_window_seconds, as before settling existed)",
        )

    traffic_args(sub.add_parser("throughput", help=">= 10k durable msg/s, 1:1"), 11_000)
    traffic_args(sub.add_parser("latency", help="p99 send-to-deliver at 5k msg/s"), 5_000)
    sp = sub.add_parser("idle-connections", help="relay RSS per idle authenticated WebSocket")
    sp.add_argument("--connections", type=int, default=19_900)
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--source-addrs", type=int, default=4)
    sp.add_argument("--settle", type=float, default=5.0)
    sp.add_argument("--connect-timeout", type=float, default=300.0)
    sp.add_argument(
        "--frame-auth",
        action="store_true",
        help="authenticate by a first auth frame instead of upgrade headers (smaller request)",
    )
    sp = sub.add_parser("group-fanout", help="1,000-recipient message accepted in <= 50 ms")
    sp.add_argument("--recipients", type=int, default=1000)
    sp.add_argument("--messages", type=int, default=50)
    sp.add_argument("--workers", type=int, default=1)
    sp.add_argument("--body-bytes", type=int, default=200)
    sp.add_argument("--pause", type=float, default=0.1, help="seconds between group messages")
    sp.add_argument("--offline", action="store_true", help="recipients not connected")
    return p


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    if args.store == "both" and not args.url:
        runs: dict[str, Any] = {}
        for store in ("sqlite", "postgres"):
            runs[store] = await amain(argparse.Namespace(**{**vars(args), "store": store}))
        cpu = {k: v.get("relay_cpu_us_per_msg") for k, v in runs.items()}
        if cpu["sqlite"] and cpu["postgres"]:
            ratio = cpu["postgres"] / cpu["sqlite"]
            print(
                f"== relay CPU per message: postgres {cpu['postgres']:.0f} us / sqlite"
                f" {cpu['sqlite']:.0f} us = {ratio:.2f}x (target <= 1.5x)"
                f" -> {verdict(ratio <= 1.5)}"
            )
            runs["cpu_ratio_postgres_to_sqlite"] = ratio
        return runs
    if args.scenario in ("throughput", "latency"):
        return await traffic_scenario(args, args.scenario)
    if args.scenario == "idle-connections":
        return await idle_scenario(args)
    return await fanout_scenario(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 1 or (args.nodes > 1 and (args.store != "postgres" or args.url)):
        parser.error("--nodes N (N > 1) starts relay nodes on PostgreSQL: add --store postgres")
    if args.url and not args.url.startswith(("http://127.", "http://localhost")):
        print("refusing: the load tool only targets loopback relays")
        return 2
    out = asyncio.run(amain(args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
