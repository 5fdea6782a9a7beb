"""`blindpost daemon` benchmark: paced `send` calls from one client; prints figures.

Run: ``python bench/daemon_bench.py [--calls 10000] [--rate 1000] [--window 64]``
(a tiny check: ``--calls 50 --rate 100``).

Not a test (pytest does not collect it). Issue 18's target: the daemon handles 1,000
``send`` calls/s from one client with p99 at most 20 ms of its own time. A real relay
process runs on loopback; two accounts are made with ``blindpost init``. Two runs at the
same pace, side by side:

* ``sdk``: the SDK alone, in this process: ``Client.send_text`` (returns once the relay
  accepted the message), the same account, the same recipient;
* ``daemon``: ``blindpost daemon --socket`` in its own process; one subscribed client
  writes JSON-RPC ``send`` requests at the pace and times each until its answer (it also
  reads the ``sent`` notification of each message, as a bot does).

Latency counts from the moment a call is made (a call waits for a free slot of
``--window`` first; how far the run fell behind its pace is printed as the achieved
rate). The daemon's own time is the difference of the two distributions (p99 daemon minus
p99 sdk), plus the daemon process's CPU seconds per 1,000 calls. Figures from a machine
that runs anything else are not worth publishing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from relay_harness import LOOSE_LIMITS, RelayProcess  # noqa: E402

from e2ee.client import Client, ClientOptions  # noqa: E402

BLINDPOST = Path(sys.executable).parent / "blindpost"
RELAY_SETTINGS = {
    **LOOSE_LIMITS,
    "send_burst": "1000000",
    "send_rate": "1000000",
    "account_send_rate": "1000000",
    "account_max_inflight_sends": "1000000",
    "mailbox_max_messages": "1000000",
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, latencies: list[float], elapsed: float, extra: str = "") -> None:
    ms = [v * 1000 for v in latencies]
    print(
        f"{name:7} {len(ms)} calls in {elapsed:.2f} s = {len(ms) / elapsed:,.0f}/s; "
        f"latency ms p50 {statistics.median(ms):.2f} p95 {percentile(ms, 0.95):.2f} "
        f"p99 {percentile(ms, 0.99):.2f} max {max(ms):.2f}{extra}",
        flush=True,
    )


async def paced(calls: int, rate: float, window: int, call: object) -> tuple[list[float], float]:
    """Make ``calls`` calls at ``rate``/s, at most ``window`` in flight; latencies, elapsed."""
    assert callable(call)
    slots = asyncio.Semaphore(window)
    latencies: list[float] = []
    began = time.perf_counter()

    async def one(i: int) -> None:
        try:
            start = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - start)
        finally:
            slots.release()

    tasks = []
    for i in range(calls):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return latencies, time.perf_counter() - began


async def run_sdk(data: Path, calls: int, rate: float, window: int) -> list[float]:
    client = await Client.open(data, None, options=ClientOptions())
    try:
        await client.start(receive=True)  # as the daemon runs it
        await client.wait_connected()
        await client.send_text("bench_b", "warm-up")

        async def call(i: int) -> None:
            await client.send_text("bench_b", f"sdk {i}")

        latencies, elapsed = await paced(calls, rate, window, call)
    finally:
        await client.close()
    report("sdk", latencies, elapsed)
    return latencies


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_daemon(data: Path, sock: Path, calls: int, rate: float, window: int) -> list[float]:
    proc = await asyncio.create_subprocess_exec(
        str(BLINDPOST), "--data", str(data), "daemon", "--socket", str(sock),
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 60)
    if b"listening on unix:" not in line:
        raise SystemExit(f"the daemon did not start: {line.decode(errors='replace')}")
    reader, writer = await asyncio.open_unix_connection(str(sock), limit=1 << 24)
    waiting: dict[int, asyncio.Future[dict[str, object]]] = {}

    async def answers() -> None:
        while raw := await reader.readline():
            message = json.loads(raw)
            future = waiting.pop(message.get("id"), None)
            if future is not None:
                future.set_result(message)

    async def drain_stderr() -> None:
        assert proc.stderr is not None
        while await proc.stderr.readline():
            pass

    reading = asyncio.create_task(answers())
    draining = asyncio.create_task(drain_stderr())
    ids = itertools.count(1)

    async def send(text: str) -> None:
        request_id = next(ids)
        future = asyncio.get_running_loop().create_future()
        waiting[request_id] = future
        params = {"to": "bench_b", "text": text}
        request = {"jsonrpc": "2.0", "id": request_id, "method": "send", "params": params}
        writer.write((json.dumps(request) + "\n").encode())
        answer = await future
        if "result" not in answer:
            raise SystemExit(f"send failed: {answer}")

    try:
        # Subscribed, as a bot is: the daemon also sends a "sent" notification per call.
        writer.write(b'{"jsonrpc": "2.0", "id": 0, "method": "subscribe"}\n')
        await send("warm-up")
        cpu_before = cpu_seconds(proc.pid)

        async def call(i: int) -> None:
            await send(f"daemon {i}")

        latencies, elapsed = await paced(calls, rate, window, call)
        cpu = cpu_seconds(proc.pid) - cpu_before
    finally:
        writer.close()
        proc.terminate()
        await proc.wait()
        reading.cancel()
        draining.cancel()
    report("daemon", latencies, elapsed, f"; daemon CPU {cpu / calls * 1000:.2f} s per 1,000")
    return latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000, help="send calls per run")
    parser.add_argument("--rate", type=float, default=1000.0, help="calls per second")
    parser.add_argument("--window", type=int, default=64, help="calls in flight at most")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bp-daemon-bench-"))
    relay = RelayProcess(root / "relay", RELAY_SETTINGS).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_")}
        for name in ("bench_a", "bench_b"):
            subprocess.run(
                [str(BLINDPOST), "--data", str(root / name), "init", name, "--relay", relay.url],
                check=True, env=env, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        sdk = await run_sdk(root / "bench_a", args.calls, args.rate, args.window)
        daemon = await run_daemon(
            root / "bench_a", root / "d.sock", args.calls, args.rate, args.window
        )
        own = percentile(daemon, 0.99) * 1000 - percentile(sdk, 0.99) * 1000
        print(
            f"daemon's own time at p99 (daemon p99 - sdk p99): {own:.2f} ms "
            f"(target <= 20 ms at 1,000 calls/s; load average {os.getloadavg()[0]:.1f})"
        )
    finally:
        relay.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
