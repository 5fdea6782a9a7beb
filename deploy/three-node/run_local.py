#!/usr/bin/env python3
"""Run the three-node recipe of docs/self-hosting.md on this machine, then tear it down.

    python deploy/three-node/run_local.py up STATE_DIR [--async-replica] [--set key=value ...]
    python deploy/three-node/run_local.py down STATE_DIR
    python deploy/three-node/run_local.py failover STATE_DIR  # stop primary, promote replica
    python deploy/three-node/run_local.py run [--async-replica]  # up in a temp dir; Ctrl-C: down

``up`` starts a PostgreSQL primary (initdb) and a streaming replica (pg_basebackup -R), a Redis,
three relay nodes (deploy/three-node/node{1,2,3}.toml) and HAProxy (deploy/three-node/haproxy.cfg),
writes STATE_DIR/topology.json (addresses, pids, data dirs), prints it and exits: the processes
keep running until ``down``.

Invariants: everything listens on 127.0.0.1 only, on ports picked free at start-up; every data
directory is new and is removed by ``down``; the machine's own PostgreSQL, Redis and HAProxy
configuration are never read or changed; ``down`` signals only processes this script started
(it checks each recorded pid's command line before signalling it). Run it with the project's
virtualenv Python: the relay nodes are started as ``sys.executable -m relay``.
"""

# ruff: noqa: S603, S310  (runs the binaries and loopback URLs it chose itself)
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PG_BIN = Path(os.environ.get("BLINDPOST_PG_BIN", "/usr/lib/postgresql/15/bin"))
INSTALL = "sudo apt-get install -y haproxy redis-server postgresql-15"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
REPLICA_NAME = "blindpost_replica"  # cluster_name = the replica's application_name on the primary


class RecipeError(Exception):
    """Something the recipe needs is missing or did not come up (message says what)."""


def haproxy_binary() -> str | None:
    """haproxy on PATH, or Debian's /usr/sbin/haproxy (not on a non-root PATH)."""
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    pred: Any, what: str, timeout: float = START_TIMEOUT, pid: int = 0, log: Path | None = None
) -> None:
    """Wait until ``pred()`` holds; fail early if process ``pid`` (when given) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if pid and os.waitpid(pid, os.WNOHANG)[0]:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RecipeError(f"{what} exited while starting:\n{tail}")
        time.sleep(0.1)
    raise RecipeError(f"{what} did not come up within {timeout:.0f} s")


def as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` account then."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RecipeError("running as root needs runuser (util-linux) to run PostgreSQL")
    return [runuser, "-u", "postgres", "--"]


def pg(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*as_postgres(), str(PG_BIN / tool), *args],
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
    )


def psql(port: int, sql: str) -> str:
    return pg("psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-Atc", sql).stdout


def new_pg_dir(label: str) -> Path:
    """An empty directory the postgres account owns (outside STATE_DIR: a test's temporary
    directory is often unreachable for that account)."""
    path = Path(tempfile.mkdtemp(prefix=f"blindpost-recipe-{label}-"))
    if os.geteuid() == 0:
        shutil.chown(path, "postgres")
    return path


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def haproxy_servers(stats_url: str) -> dict[str, str]:
    """Server name -> status (UP, DOWN, ...) of the relay_nodes backend, from the stats CSV."""
    with urllib.request.urlopen(stats_url + ";csv", timeout=2) as resp:
        rows = resp.read().decode().splitlines()
    header = rows[0].lstrip("# ").split(",")
    out = {}
    for row in rows[1:]:
        cells = dict(zip(header, row.split(","), strict=False))
        if cells.get("pxname") == "relay_nodes" and cells.get("svname", "").startswith("node"):
            out[cells["svname"]] = cells.get("status", "")
    return out


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start a process in its own session (it outlives this script), output to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    return proc.pid


# -- up ------------------------------------------------------------------------------------


def start_primary(state: dict[str, Any]) -> None:
    data, port = new_pg_dir("primary"), free_port()
    state["postgres"]["primary"] = {"data": str(data), "port": port}
    pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    # initdb's pg_hba.conf already trusts replication connections from 127.0.0.1.
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# blindpost recipe\n"
            f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{data}'\n"
            "wal_level = replica\nmax_wal_senders = 5\nwal_keep_size = '256MB'\n"
            "hot_standby = on\nsynchronous_commit = on\n"
        )
    pg("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "start")
    pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "blindpost")


def start_replica(state: dict[str, Any]) -> None:
    primary_port = state["postgres"]["primary"]["port"]
    data, port = new_pg_dir("replica"), free_port()
    state["postgres"]["replica"] = {"data": str(data), "port": port}
    pg(
        "pg_basebackup",
        *("-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres"),
        *("-D", str(data), "-R", "-X", "stream", "--checkpoint=fast"),
    )
    # The copy carries the primary's postgresql.conf: give the replica its own port and socket
    # directory, a name the primary's synchronous_standby_names refers to, and no synchronous
    # standby of its own (that matters once it is promoted).
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# blindpost recipe: the replica\n"
            f"port = {port}\nunix_socket_directories = '{data}'\n"
            f"cluster_name = '{REPLICA_NAME}'\nsynchronous_standby_names = ''\n"
        )
    pg("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "start")
    want = "async"
    if state["postgres"]["synchronous"]:
        # Only now: with a synchronous standby named before it exists, every commit on the
        # primary (createdb included) would wait for it.
        psql(primary_port, f"ALTER SYSTEM SET synchronous_standby_names = '{REPLICA_NAME}'")
        psql(primary_port, "SELECT pg_reload_conf()")
        want = "sync"
    wait_for(
        lambda: (
            psql(primary_port, "SELECT state, sync_state FROM pg_stat_replication").strip()
            == f"streaming|{want}"
        ),
        "streaming replication",
    )


def start_redis(state: dict[str, Any], base: Path) -> None:
    server = shutil.which("redis-server")
    assert server is not None  # checked in up()
    port = free_port()
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base)]
    args += ["--save", "", "--appendonly", "no"]
    pid = spawn(args, base / "redis.log")
    state["redis"] = {"port": port, "pid": pid, "url": f"redis://127.0.0.1:{port}/0"}
    wait_for(lambda: redis_ping(port), "Redis", pid=pid, log=base / "redis.log")


def node_env(state: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_RELAY_")}
    env["BLINDPOST_RELAY_POSTGRES_DSN"] = state["postgres"]["dsn"]
    env["BLINDPOST_RELAY_REDIS_URL"] = state["redis"]["url"]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_node(state: dict[str, Any], base: Path, i: int, extra: list[str]) -> None:
    port = free_port()
    data = base / f"node{i}"
    data.mkdir()
    args = [sys.executable, "-m", "relay", "--config", str(HERE / f"node{i}.toml")]
    args += ["--host", "127.0.0.1", "--port", str(port), "--data", str(data)]
    for setting in extra:
        args += ["--set", setting]
    pid = spawn(args, base / f"node{i}.log", node_env(state))
    node = {"name": f"node{i}", "port": port, "pid": pid, "url": f"http://127.0.0.1:{port}"}
    state["nodes"].append(node)


def start_haproxy(state: dict[str, Any], base: Path, binary: str) -> None:
    front, stats = free_port(), free_port()
    env = dict(os.environ)
    env["BP_FRONT"] = f"127.0.0.1:{front}"
    env["BP_STATS"] = f"127.0.0.1:{stats}"
    for node in state["nodes"]:
        env[f"BP_{node['name'].upper()}"] = f"127.0.0.1:{node['port']}"
    cfg = str(HERE / "haproxy.cfg")
    subprocess.run([binary, "-c", "-q", "-f", cfg], check=True, env=env)
    # -db: stay in the foreground (no daemon, no service); -p names the state dir on its
    # command line, which is how ``down`` recognises it.
    pid = spawn(
        [binary, "-db", "-f", cfg, "-p", str(base / "haproxy.pid")], base / "haproxy.log", env
    )
    state["haproxy"] = {"pid": pid, "port": front, "stats_port": stats}
    state["front"] = f"http://127.0.0.1:{front}"
    state["stats"] = f"http://127.0.0.1:{stats}/stats"


def up(base: Path, sync: bool, extra: list[str]) -> dict[str, Any]:
    """Start the whole topology under ``base`` (an empty or new directory).

    Returns:
        The topology (also written to ``base/topology.json``).

    Raises:
        RecipeError: a binary is missing or a component did not come up (what was started
            stays recorded in topology.json, so ``down`` can still clean up).
    """
    haproxy = haproxy_binary()
    missing = [
        name
        for name, ok in (
            ("haproxy", haproxy is not None),
            ("redis-server", shutil.which("redis-server") is not None),
            (f"{PG_BIN}/pg_basebackup", (PG_BIN / "pg_basebackup").exists()),
        )
        if not ok
    ]
    if missing:
        raise RecipeError(f"missing {', '.join(missing)}: {INSTALL}")
    base.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "state_dir": str(base),
        "postgres": {"synchronous": sync},
        "nodes": [],
    }
    try:
        start_primary(state)
        start_replica(state)
        p, r = state["postgres"]["primary"]["port"], state["postgres"]["replica"]["port"]
        # Both servers in one DSN: after a promotion the nodes' new connections find the
        # writable one by themselves (target_session_attrs=read-write).
        state["postgres"]["dsn"] = (
            f"postgresql://postgres@127.0.0.1:{p},127.0.0.1:{r}/blindpost"
            "?target_session_attrs=read-write"
        )
        start_redis(state, base)
        for i in (1, 2, 3):
            start_node(state, base, i, extra)
            save(base, state)
            # One at a time: the first node creates the schema.
            node = state["nodes"][-1]
            wait_for(
                lambda url=node["url"]: http_ok(url + "/healthz"),
                f"relay {node['name']}",
                pid=node["pid"],
                log=base / f"{node['name']}.log",
            )
        start_haproxy(state, base, haproxy)  # type: ignore[arg-type]
        save(base, state)
        wait_for(
            lambda: (
                http_ok(state["stats"]) and set(haproxy_servers(state["stats"]).values()) == {"UP"}
            ),
            "HAProxy with three nodes up",
            pid=state["haproxy"]["pid"],
            log=base / "haproxy.log",
        )
        wait_for(lambda: http_ok(state["front"] + "/healthz"), "HAProxy's front end")
    finally:
        save(base, state)
    return state


def save(base: Path, state: dict[str, Any]) -> None:
    (base / "topology.json").write_text(json.dumps(state, indent=2) + "\n")


# -- down ----------------------------------------------------------------------------------


def ours(pid: int, marker: str) -> bool:
    """True if ``pid`` runs and its command line contains ``marker`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def stop_pid(pid: int, marker: str, sig: int = signal.SIGTERM) -> None:
    if not ours(pid, marker):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT
    while ours(pid, marker) and time.monotonic() < deadline:
        try:  # reap it if it is our child (``run``), else just wait for it to go
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if ours(pid, marker):
        os.kill(pid, signal.SIGKILL)


def down(base: Path) -> None:
    """Stop everything ``up`` recorded under ``base`` and remove its data directories."""
    path = base / "topology.json"
    if not path.exists():
        return
    state = json.loads(path.read_text())
    if "haproxy" in state:
        stop_pid(state["haproxy"]["pid"], str(base))
    for node in state["nodes"]:
        stop_pid(node["pid"], str(base))
    if "redis" in state:
        # redis-server rewrites its process title to "redis-server 127.0.0.1:PORT".
        stop_pid(state["redis"]["pid"], f"127.0.0.1:{state['redis']['port']}")
    for role in ("replica", "primary"):
        server = state["postgres"].get(role)
        if server is None:
            continue
        if Path(server["data"], "postmaster.pid").exists():
            subprocess.run(
                [
                    *as_postgres(),
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    server["data"],
                    "-m",
                    "fast",
                    "stop",
                ],
                check=False,
                capture_output=True,
                cwd="/",
            )
        shutil.rmtree(server["data"], ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


def failover(base: Path) -> dict[str, Any]:
    """Lose the primary (fast stop, as if its host died) and promote the replica.

    Returns:
        The topology, with ``postgres.promoted`` set.
    """
    state: dict[str, Any] = json.loads((base / "topology.json").read_text())
    primary, replica = state["postgres"]["primary"], state["postgres"]["replica"]
    pg("pg_ctl", "-D", primary["data"], "-m", "fast", "stop")
    pg("pg_ctl", "-D", replica["data"], "-w", "promote")
    wait_for(
        lambda: psql(replica["port"], "SELECT pg_is_in_recovery()").strip() == "f",
        "the promoted replica",
    )
    state["postgres"]["promoted"] = True
    save(base, state)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "failover", "run"])
    parser.add_argument("state_dir", nargs="?", type=Path)
    parser.add_argument(
        "--async-replica",
        action="store_true",
        help="commits do not wait for the replica (a lost primary may take the last acks along)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra relay setting"
    )
    args = parser.parse_args(argv)
    if args.command != "run" and args.state_dir is None:
        parser.error(f"{args.command} needs STATE_DIR")
    try:
        if args.command == "up":
            print(json.dumps(up(args.state_dir, not args.async_replica, args.set), indent=2))
        elif args.command == "down":
            down(args.state_dir)
        elif args.command == "failover":
            print(json.dumps(failover(args.state_dir), indent=2))
        else:
            base = Path(tempfile.mkdtemp(prefix="blindpost-recipe-"))
            try:
                state = up(base, not args.async_replica, args.set)
                print(json.dumps(state, indent=2))
                print(f"clients: {state['front']}   status: {state['stats']}   Ctrl-C stops all")
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
            finally:
                down(base)
    except (RecipeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"run_local: {exc}\n{detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
