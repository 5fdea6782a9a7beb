# Invariants:
# * Both systems get the same load shape, from the same kind of load process (JSON-lines worker
#   subprocesses, open-loop pacing, CLOCK_MONOTONIC timestamps in 200-byte bodies), and runs
#   alternate system by system within each round, so a change in the machine's speed hits both
#   (and the floor server's, with --floor).
# * Everything it starts listens on 127.0.0.1 only, lives in a temporary directory, and is
#   stopped (and the directory removed) when a run ends, also on error or Ctrl-C.
# * ejabberd comes from the installed Debian package and is started directly with erl (no
#   ejabberdctl, no Erlang distribution, no epmd): mnesia storage, mod_offline on, plain
#   password storage (so logins do not leave PBKDF2 work behind), shaper off, file limit raised.
# * It prints figures and ratios; it asserts nothing (a measurement, not a test).
"""Blindpost relay and ejabberd side by side: throughput, latency, CPU, drain, memory.

Needs the Debian package: ``apt-get install ejabberd`` (the package's own service is not used).
The command behind the table in docs/performance-relay.md::

    python bench/peer_ejabberd.py --rounds 3

Shorter runs: ``--only latency`` (2,000 and 5,000 msg/s), ``--only throughput``,
``--only drain``, ``--only idle``; ``--duration`` and ``--idle-connections`` scale them down.
``--floor`` adds a third system to the traffic runs: ``bench/_floor_server.py``, which answers
the relay's load with the relay's frames on the relay's stack (aiohttp on uvloop) and does
none of its work (no storage, checks or acks): what any relay built on that stack pays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
import relay_load as rl  # noqa: E402
from _relay_load_worker import device_signer  # noqa: E402

from e2ee.transport.frames import encode_ack, encode_send  # noqa: E402

XMPP_WORKER = ROOT / "bench" / "_xmpp_load_worker.py"
FLOOR_SERVER = ROOT / "bench" / "_floor_server.py"
DOMAIN = "bench.localhost"
ERL_LIBS = Path("/usr/lib/x86_64-linux-gnu")
START_TIMEOUT = 60.0

EJABBERD_YML = """\
hosts: ["{domain}"]
loglevel: warning
hide_sensitive_log_data: true
certfiles: []
auth_method: [internal]
auth_password_format: plain
registration_timeout: infinity
listen:
  - port: {port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: none
    access: c2s
acl:
  local:
    user_regexp: ""
access_rules:
  c2s:
    allow: all
  register:
    allow: all
shaper_rules:
  max_user_offline_messages: 1000000
  max_user_sessions: 10
  c2s_shaper: none
modules:
  mod_offline:
    access_max_user_messages: max_user_offline_messages
  mod_register:
    access: register
    ip_access: register
  mod_roster: {{}}
  mod_ping: {{}}
"""


# -- ejabberd node ---------------------------------------------------------------------------


@dataclass
class Node:
    host: str
    port: int
    pid: int
    log_path: Path

    def pids(self) -> list[int]:
        return [self.pid, *rl.child_pids(self.pid)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def rss_kb(self) -> int:
        return sum(rl.read_status(p, "VmRSS") or 0 for p in self.pids())


def ejabberd_ebin() -> Path:
    found = sorted(ERL_LIBS.glob("ejabberd-*/ebin/ejabberd.app"))
    if not found or shutil.which("erl") is None:
        raise SystemExit("ejabberd is not installed: apt-get install ejabberd")
    return found[-1].parent


@contextlib.contextmanager
def ejabberd_node(keep: bool = False) -> Iterator[Node]:
    """Start a throwaway ejabberd node on a free loopback port; stop and remove it afterwards."""
    ejabberd_ebin()
    tmp = Path(tempfile.mkdtemp(prefix="blindpost-ejabberd-"))
    port = rl.free_port()
    (tmp / "spool").mkdir()
    cfg = tmp / "ejabberd.yml"
    cfg.write_text(EJABBERD_YML.format(domain=DOMAIN, port=port))
    log_path = tmp / "ejabberd.log"
    env = {
        **os.environ,
        "ERL_LIBS": str(ERL_LIBS),
        "EJABBERD_CONFIG_PATH": str(cfg),
        "EJABBERD_LOG_PATH": str(log_path),
        "ERL_MAX_PORTS": "250000",
        "ERL_CRASH_DUMP": str(tmp / "erl_crash.dump"),
    }
    args = ["erl", "+K", "true", "+P", "1000000", "-noinput", "-noshell"]
    args += ["-mnesia", "dir", f'"{tmp / "spool"}"', "-s", "ejabberd"]
    with open(tmp / "erl.out", "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=rl._raise_child_fd_limit,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ejabberd exited:\n" + (tmp / "erl.out").read_text()[-2000:])
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"ejabberd did not listen within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)
        yield Node("127.0.0.1", port, proc.pid, log_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # erl stops the node cleanly on SIGTERM
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet(enabled: bool) -> Iterator[None]:
    """Silence relay_load's own per-run printout (the table says it all) unless --verbose."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


class XmppWorker(rl.Worker):
    """The XMPP load worker, driven over the same JSON lines as the relay's."""

    script = XMPP_WORKER


async def xmpp_workers(cfgs: list[dict[str, Any]], timeout: float) -> list[XmppWorker]:
    workers = [await XmppWorker.start(c) for c in cfgs]
    readies = await asyncio.gather(*(w.event(timeout) for w in workers))
    failed = {k: v for r in readies for k, v in r["failed"].items()}
    if failed:
        raise RuntimeError(f"XMPP logins failed: {failed}")
    return workers


def xmpp_base(node: Node, prefix: str) -> dict[str, Any]:
    return {
        "host": node.host,
        "port": node.port,
        "domain": DOMAIN,
        "prefix": prefix,
        "password": "bench-password",
    }


async def register_xmpp(node: Node, prefix: str, count: int, workers: int) -> None:
    """In-band registration of ``<prefix>0 ..``: log each in once, then log out."""
    cfgs = [
        {**xmpp_base(node, prefix), "mode": "idle", "register": True, "indices": list(r)}
        for r in rl.split(count, workers)
    ]
    ws = await xmpp_workers(cfgs, 300)
    for w in ws:
        await w.command("close")
    await asyncio.gather(*(w.event(120) for w in ws))
    for w in ws:
        await w.finish()


# -- scenarios -------------------------------------------------------------------------------


def summarize(
    name: str, rate: float, duration: float, results: list[dict[str, Any]], cpu: float
) -> dict[str, Any]:
    lat = sorted(v for r in results for v in r["latencies_us"])
    accepted = sum(r["accepted_in_window"] for r in results)
    return {
        "system": name,
        "offered": rate,
        "received_per_s": sum(r["delivered_in_window"] for r in results) / duration,
        "p50_ms": rl.pct(lat, 50) / 1000,
        "p99_ms": rl.pct(lat, 99) / 1000,
        "cpu_us_per_msg": 1e6 * cpu / max(1, accepted),
    }


async def traffic_ejabberd(args: argparse.Namespace, rate: float) -> dict[str, Any]:
    prefix = f"lt{secrets.token_hex(3)}_"
    with ejabberd_node(args.keep) as node:
        await register_xmpp(node, prefix, args.clients, args.workers)
        base = {
            **xmpp_base(node, prefix),
            "mode": "traffic",
            "register": False,
            "peers": args.clients,
            "warmup": args.warmup,
            "duration": args.duration,
            "body_bytes": args.body_bytes,
            "drain": args.drain,
        }
        ranges = rl.split(args.clients, args.workers)
        cfgs = [
            {**base, "indices": list(r), "rate": rate * (r[1] - r[0]) / args.clients}
            for r in ranges
        ]
        workers = await xmpp_workers(cfgs, 120)
        t0 = time.monotonic_ns() + 500_000_000
        for w in workers:
            await w.command(f"go {t0}")
        await asyncio.sleep(0.5 + args.warmup)
        cpu0 = node.cpu_seconds()
        await asyncio.sleep(args.duration)
        cpu1 = node.cpu_seconds()
        total = args.warmup + args.duration + args.drain + 60
        results = await asyncio.gather(*(w.event(total) for w in workers))
        for w in workers:
            await w.finish()
    return summarize("ejabberd", rate, args.duration, results, cpu1 - cpu0)


# relay_load's options for the relay it starts: one process on SQLite (its --store, --nodes,
# --redis-url and --postgres-dsn defaults).
_ONE_SQLITE_RELAY: dict[str, Any] = {
    "store": "sqlite",
    "nodes": 1,
    "redis_url": None,
    "postgres_dsn": None,
}


@contextlib.contextmanager
def floor_server() -> Iterator[tuple[str, int]]:
    """Start ``bench/_floor_server.py`` on a free loopback port; yield its URL and pid."""
    port = rl.free_port()
    proc = subprocess.Popen(
        [sys.executable, str(FLOOR_SERVER), "--port", str(port)],
        cwd=ROOT,
        preexec_fn=rl._raise_child_fd_limit,  # the relay's own file limit
    )
    try:
        rl.wait_for_port(proc, port, START_TIMEOUT, "the floor server")
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        rl.stop_process(proc, 10)


async def traffic_floor(args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """The relay's load against the floor server: the stack's share of latency and CPU."""
    with floor_server() as (url, pid):
        return await traffic_relay(args, rate, url, pid, system="floor")


async def traffic_relay(
    args: argparse.Namespace,
    rate: float,
    url: str | None = None,
    pid: int | None = None,
    system: str = "relay",
) -> dict[str, Any]:
    ns = argparse.Namespace(
        url=url,
        relay_pid=pid,
        keep=args.keep,
        relay_set=args.relay_set,
        rate=rate,
        duration=args.duration,
        warmup=args.warmup,
        drain=args.drain,
        clients=args.clients,
        workers=args.workers,
        body_bytes=args.body_bytes,
        no_ack=False,
        no_settle=False,
        **_ONE_SQLITE_RELAY,
    )
    with quiet(not args.verbose):
        out = await rl.traffic_scenario(ns, "latency")
    return {
        "system": system,
        "offered": rate,
        "received_per_s": out["delivered_per_s"],
        "p50_ms": out["p50_ms"],
        "p99_ms": out["p99_ms"],
        "cpu_us_per_msg": out["relay_cpu_us_per_msg"],
    }


async def drain_ejabberd(args: argparse.Namespace) -> float:
    prefix = f"ld{secrets.token_hex(3)}_"
    with ejabberd_node(args.keep) as node:
        await register_xmpp(node, prefix, 2, 1)
        base = {**xmpp_base(node, prefix), "body_bytes": args.body_bytes, "register": False}
        sender = (
            await xmpp_workers(
                [
                    {
                        **base,
                        "mode": "drain-send",
                        "indices": [0, 1],
                        "to": f"{prefix}1",
                        "count": args.queued,
                    }
                ],
                60,
            )
        )[0]
        await sender.command("go")
        await sender.event(300)
        await sender.finish()
        recv = await XmppWorker.start(
            {**base, "mode": "drain-receive", "user": f"{prefix}1", "count": args.queued}
        )
        res = await recv.event(300)
        await recv.finish()
    if res["delivered"] < args.queued:
        raise RuntimeError(f"ejabberd delivered {res['delivered']} of {args.queued}")
    return float(res["seconds"])


async def drain_relay(args: argparse.Namespace) -> float:
    seed, prefix = secrets.token_hex(8), f"ld{secrets.token_hex(3)}_"
    with rl.relay_process(
        {}, keep=args.keep, extra_settings=dict(s.split("=", 1) for s in args.relay_set)
    ) as relay:
        with quiet(True):
            await rl.register_devices(relay.url, seed, prefix, 2)
        sender = device_signer(seed, prefix, 0)
        receiver = device_signer(seed, prefix, 1)
        pad = b"\x00" * (args.body_bytes - 8)
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(
                relay.url + "/v1/ws", headers=sender.sign_headers("GET", "/v1/ws")
            )
            ok = 0

            async def results() -> None:
                nonlocal ok
                while ok < args.queued:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"sender socket closed: {ws.close_code}")
                    if '"send_result"' in msg.data:
                        if json.loads(msg.data).get("status") != 200:
                            raise RuntimeError(f"send refused: {msg.data}")
                        ok += 1

            reader = asyncio.ensure_future(results())
            for _ in range(args.queued):
                t = time.monotonic_ns().to_bytes(8, "big")
                await ws.send_bytes(encode_send(os.urandom(16), ((receiver.user, 1),), t + pad))
            await asyncio.wait_for(reader, 300)
            await ws.close()
            # The recipient comes online: time until the last queued message has arrived (it
            # acknowledges as a client does, in batches, so the relay keeps pushing).
            t_start = time.monotonic_ns()
            ws = await session.ws_connect(
                relay.url + "/v1/ws", headers=receiver.sign_headers("GET", "/v1/ws")
            )
            got, ids, t_last = 0, [], t_start
            while got < args.queued:
                msg = await asyncio.wait_for(ws.receive(), 60)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got += 1
                    t_last = time.monotonic_ns()
                    ids.append(bytes(msg.data[9:25]))
                    if len(ids) >= 500:
                        await ws.send_str(encode_ack(ids))
                        ids = []
                elif msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"receiver socket closed: {ws.close_code}")
            await ws.close()
    return (t_last - t_start) / 1e9


async def idle_ejabberd(args: argparse.Namespace) -> float:
    n = args.idle_connections
    prefix = f"li{secrets.token_hex(3)}_"
    with ejabberd_node(args.keep) as node:
        await register_xmpp(node, prefix, n, args.workers)  # accounts exist before "before"
        await asyncio.sleep(1.0)
        before = node.rss_kb()
        addrs = rl.source_addrs(4)
        cfgs = [
            {
                **xmpp_base(node, prefix),
                "mode": "idle",
                "register": False,
                "indices": list(r),
                "source_addrs": addrs[i::2],
            }
            for i, r in enumerate(rl.split(n, args.workers))
        ]
        workers = await xmpp_workers(cfgs, 600)
        await asyncio.sleep(args.settle)
        after = node.rss_kb()
        for w in workers:
            await w.command("close")
        await asyncio.gather(*(w.event(120) for w in workers))
        for w in workers:
            await w.finish()
    return float((after - before) * 1024 / n)


async def idle_relay(args: argparse.Namespace) -> float:
    ns = argparse.Namespace(
        url=None,
        relay_pid=None,
        keep=args.keep,
        relay_set=args.relay_set,
        connections=args.idle_connections,
        workers=args.workers,
        source_addrs=4,
        settle=args.settle,
        connect_timeout=600,
        frame_auth=False,
        **_ONE_SQLITE_RELAY,
    )
    with quiet(not args.verbose):
        out = await rl.idle_scenario(ns)
    return float(out["bytes_per_conn"])


# -- the table -------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    want = set(args.only or ["latency", "throughput", "drain", "idle"])
    rates = ([2000.0, 5000.0] if "latency" in want else []) + (
        [11000.0, 14000.0] if "throughput" in want else []
    )
    runs: dict[str, list[Any]] = {}
    systems: list[tuple[str, Callable[..., Any], Callable[..., Any] | None, Any]] = [
        ("relay", traffic_relay, drain_relay, idle_relay),
        ("ejabberd", traffic_ejabberd, drain_ejabberd, idle_ejabberd),
    ]
    if args.floor:
        systems.append(("floor", traffic_floor, None, None))
    for rnd in range(args.rounds):
        order = systems if rnd % 2 == 0 else systems[::-1]  # alternate who goes first
        for rate in rates:
            for name, traffic, _, _ in order:
                if name == "floor" and rate > 5000:
                    continue  # the floor is a latency reference
                r = await traffic(args, rate)
                runs.setdefault(f"traffic:{name}:{rate:.0f}", []).append(r)
                print(
                    f"round {rnd + 1} {name:8} {rate:6.0f}/s: received {r['received_per_s']:7.0f}/s"
                    f"  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                    f"  CPU {r['cpu_us_per_msg']:5.0f} us/msg  (load avg"
                    f" {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        if "drain" in want:
            for name, _, drain, _ in order:
                if drain is None:
                    continue
                s = await drain(args)
                runs.setdefault(f"drain:{name}", []).append(s)
                print(
                    f"round {rnd + 1} {name:8} drained {args.queued} queued in {s:.3f} s",
                    flush=True,
                )
        if "idle" in want:
            for name, _, _, idle in order:
                if idle is None:
                    continue
                b = await idle(args)
                runs.setdefault(f"idle:{name}", []).append(b)
                print(
                    f"round {rnd + 1} {name:8} {b / 1024:.1f} KB RSS per idle connection"
                    f" ({args.idle_connections})",
                    flush=True,
                )
    print_table(args, runs)
    return runs


def print_table(args: argparse.Namespace, runs: dict[str, list[Any]]) -> None:
    def t(name: str, rate: float, key: str) -> float:
        return med([r[key] for r in runs.get(f"traffic:{name}:{rate:.0f}", [])])

    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, a: float, b: float, fmt: str, ratio: float | None = None) -> None:
        r = ratio if ratio is not None else (a / b if b else float("nan"))
        rows.append((label, fmt.format(a), fmt.format(b), f"{r:.2f}"))

    for rate in (11000.0, 14000.0):
        if f"traffic:relay:{rate:.0f}" in runs:
            row(
                f"received msg/s at {rate:,.0f} offered",
                t("relay", rate, "received_per_s"),
                t("ejabberd", rate, "received_per_s"),
                "{:,.0f}",
            )

    def vs_ejabberd(
        name: str, rates: list[float], cpu_rates: list[float]
    ) -> list[tuple[str, str, str, str]]:
        """Latency rows at ``rates`` and one CPU row at ``cpu_rates``: ``name`` against
        ejabberd."""
        out = []
        for rate in rates:
            a50, a99 = t(name, rate, "p50_ms"), t(name, rate, "p99_ms")
            b50, b99 = t("ejabberd", rate, "p50_ms"), t("ejabberd", rate, "p99_ms")
            out.append(
                (
                    f"p50 / p99 at {rate:,.0f} msg/s",
                    f"{a50:.2f} / {a99:.2f} ms",
                    f"{b50:.2f} / {b99:.2f} ms",
                    f"{a50 / b50:.1f}x / {a99 / b99:.1f}x",
                )
            )
        if cpu_rates:
            a = [t(name, r, "cpu_us_per_msg") for r in cpu_rates]
            b = [t("ejabberd", r, "cpu_us_per_msg") for r in cpu_rates]
            out.append(
                (
                    "server CPU per message at "
                    + " / ".join(f"{r / 1000:.0f}k" for r in cpu_rates),
                    " / ".join(f"{v:.0f}" for v in a) + " us",
                    " / ".join(f"{v:.0f}" for v in b) + " us",
                    " / ".join(f"{x / y:.2f}" for x, y in zip(a, b, strict=True)),
                )
            )
        return out

    def ran(name: str, rates: tuple[float, ...]) -> list[float]:
        return [r for r in rates if f"traffic:{name}:{r:.0f}" in runs]

    def print_rows(name: str, table: list[tuple[str, str, str, str]]) -> None:
        print(f"| | {name} | ejabberd | {name} / ejabberd |\n|---|---|---|---|")
        for label, a_s, b_s, r_s in table:
            print(f"| {label} | {a_s} | {b_s} | {r_s} |")

    rows += vs_ejabberd(
        "relay", ran("relay", (2000.0, 5000.0)), ran("relay", (2000.0, 5000.0, 11000.0))
    )
    if "drain:relay" in runs:
        a, b = med(runs["drain:relay"]), med(runs["drain:ejabberd"])
        rows.append(
            (
                f"{args.queued:,} queued messages drained",
                f"{a:.2f} s",
                f"{b:.2f} s",
                f"{b / a:.1f}x faster" if a < b else f"{a / b:.1f}x slower",
            )
        )
    if "idle:relay" in runs:
        row(
            f"RSS per idle connection ({args.idle_connections:,})",
            med(runs["idle:relay"]) / 1024,
            med(runs["idle:ejabberd"]) / 1024,
            "{:.1f} KB",
        )
    print(
        f"\nmedians of {args.rounds} alternating round(s); {args.clients} clients on"
        f" {args.workers} load processes, client k sends to k+{args.clients // 2},"
        f" {args.body_bytes}-byte bodies, {args.warmup:.0f} s warm-up, {args.duration:.0f} s"
        f" window; load average now {os.getloadavg()[0]:.1f}\n"
    )
    print_rows("relay", rows)
    floor_rates = ran("floor", (2000.0, 5000.0))
    if floor_rates:
        print(
            "\nThe floor: the same load on the same stack with none of the relay's work"
            " (bench/_floor_server.py)\n"
        )
        print_rows("floor", vs_ejabberd("floor", floor_rates, floor_rates))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", action="append", choices=["latency", "throughput", "drain", "idle"])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--drain", type=float, default=3.0, help="seconds to wait for stragglers")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--workers", type=int, default=2, help="load processes")
    p.add_argument("--body-bytes", type=int, default=200)
    p.add_argument("--queued", type=int, default=10_000, help="drain: messages queued offline")
    p.add_argument("--idle-connections", type=int, default=5_000)
    p.add_argument("--settle", type=float, default=5.0, help="idle: seconds before RSS is read")
    p.add_argument("--relay-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep", action="store_true", help="keep temporary directories and logs")
    p.add_argument(
        "--floor",
        action="store_true",
        help="latency runs also against bench/_floor_server.py: the relay's frames on its"
        " stack (aiohttp, uvloop) with none of its work, the floor any relay on it pays",
    )
    p.add_argument("--verbose", action="store_true", help="also print relay_load's own output")
    p.add_argument("--json", type=Path, help="also write every run's figures as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = asyncio.run(amain(args))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
