"""`blindpost daemon` benchmark: paced `send` calls from one client; prints figures.

Run: ``python bench/daemon_bench.py`` (about 1.5 minutes: 10 s runs at 1,000 and 100
calls/s) or ``python bench/daemon_bench.py --rates 1000 --seconds 5``; a tiny check that it
runs: ``--rates 50 --seconds 1``.

Not a test (pytest does not collect it). Issue 18's target: the daemon handles 1,000
``send`` calls/s from one client with p99 at most 20 ms of its own time. A real relay
process runs on loopback; two accounts are made with ``blindpost init``. At each offered
rate, two runs of the same paced load, side by side:

* ``sdk``: the SDK alone, in this process: ``Client.send_text`` (returns once the relay
  accepted the message), the same account, the same recipient;
* ``daemon``: ``blindpost daemon --socket`` in its own process; one subscribed client
  writes JSON-RPC ``send`` requests at the pace and times each until its answer (it also
  reads the ``sent`` notification of each message, as a bot does).

Latency counts from the moment a call is made (a call waits for a free slot of
``--window`` first; how far the run fell behind its pace is printed as the achieved
rate). CPU is the process's user + system time per call (for ``sdk``, this process's,
which also runs the pacing loop).

**The daemon's own time** is what a call costs on top of the SDK call it makes: reading
and parsing the request line, dispatch, checking the parameters, the answer and the
``sent`` notification written back, and the event loop work that comes with them. The
script gives it two ways: in latency, daemon p99 minus sdk p99 at the same offered rate
(meaningful only at a rate the SDK alone sustains: past that both runs queue, and the
difference is queueing); and in CPU, daemon CPU per call minus sdk CPU per call.
"Handles 1,000 calls/s" is the achieved rate of the daemon run at an offered 1,000/s.
Figures from a machine that runs anything else are not worth publishing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from relay_harness import LOOSE_LIMITS, RelayProcess  # noqa: E402

from blindpost_wire.loop import EVENT_LOOPS  # noqa: E402
from e2ee.client import Client, ClientOptions  # noqa: E402

BLINDPOST = Path(sys.executable).parent / "blindpost"
RELAY_SETTINGS = {
    **LOOSE_LIMITS,
    "send_burst": "1000000",
    "send_rate": "1000000",
    "account_send_rate": "1000000",
    "account_max_inflight_sends": "1000000",
    "mailbox_max_messages": "1000000",
    # bench_b never answers bench_a: the stranger's share of its mailbox applies.
    "mailbox_sender_max_messages": "1000000",
    "mailbox_stranger_max_messages": "1000000",
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Run:
    """One paced run: latencies (seconds), elapsed seconds, CPU seconds of the serving process."""

    name: str
    offered: float
    latencies: list[float]
    elapsed: float
    cpu: float

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000

    def cpu_ms(self) -> float:
        return self.cpu / len(self.latencies) * 1000

    def row(self) -> str:
        return (
            f"| {self.offered:,.0f} | {self.name} | {len(self.latencies)} | {self.rate:,.0f} "
            f"| {self.ms(0.5):.2f} | {self.ms(0.95):.2f} | {self.ms(0.99):.2f} "
            f"| {max(self.latencies) * 1000:.2f} | {self.cpu_ms():.2f} |"
        )


async def paced(calls: int, rate: float, window: int, call: object) -> tuple[list[float], float]:
    """Make ``calls`` calls at ``rate``/s, at most ``window`` in flight; latencies, elapsed.

    A run that falls behind its pace stops making calls when the time the calls were
    due in is over twice (so a slow path does not make the bench run for minutes).
    """
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
        if time.perf_counter() - began > 2 * calls / rate:
            break
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return latencies, time.perf_counter() - began


async def run_sdk(data: Path, calls: int, rate: float, window: int) -> Run:
    client = await Client.open(data, None, options=ClientOptions())
    try:
        await client.start(receive=True)  # as the daemon runs it
        await client.wait_connected()
        await client.send_text("bench_b", "warm-up")

        async def call(i: int) -> None:
            await client.send_text("bench_b", f"sdk {i}")

        cpu_before = time.process_time()
        latencies, elapsed = await paced(calls, rate, window, call)
        cpu = time.process_time() - cpu_before
    finally:
        await client.close()
    return Run("sdk", rate, latencies, elapsed, cpu)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_daemon(
    data: Path, sock: Path, calls: int, rate: float, window: int, loop: str
) -> Run:
    proc = await asyncio.create_subprocess_exec(
        str(BLINDPOST), "--data", str(data), "daemon", "--socket", str(sock),
        "--event-loop", loop, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
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
    return Run("daemon", rate, latencies, elapsed, cpu)


#: Issue 18's targets.
TARGET_RATE = 1000.0
TARGET_OWN_P99_MS = 20.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rates", default="1000,100", help="offered calls per second, comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--window", type=int, default=64, help="calls in flight at most")
    parser.add_argument(
        "--daemon-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="the daemon's --event-loop (auto: uvloop where installed)",
    )
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {load()}, "
        f"daemon --event-loop {args.daemon_loop}",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="bp-daemon-bench-"))
    relay = RelayProcess(root / "relay", RELAY_SETTINGS).start()
    runs: list[tuple[Run, Run]] = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_")}
        for name in ("bench_a", "bench_b"):
            subprocess.run(
                [str(BLINDPOST), "--data", str(root / name), "init", name, "--relay", relay.url],
                check=True, env=env, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        for rate in rates:
            calls = max(1, round(rate * args.seconds))
            sdk = await run_sdk(root / "bench_a", calls, rate, args.window)
            print(f"sdk    at {rate:,.0f}/s: {sdk.rate:,.0f}/s achieved [{load()}]", flush=True)
            sock = root / "d.sock"
            daemon = await run_daemon(
                root / "bench_a", sock, calls, rate, args.window, args.daemon_loop
            )
            print(f"daemon at {rate:,.0f}/s: {daemon.rate:,.0f}/s achieved [{load()}]", flush=True)
            runs.append((sdk, daemon))
    finally:
        relay.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("\n| offered /s | path | calls | achieved /s | p50 ms | p95 ms | p99 ms | max ms "
          "| CPU ms/call |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for sdk, daemon in runs:
        print(sdk.row())
        print(daemon.row())
    print()
    for sdk, daemon in runs:
        own = daemon.ms(0.99) - sdk.ms(0.99)
        sustained = sdk.rate >= 0.98 * sdk.offered
        what = "" if sustained else " (the SDK alone fell behind: queueing, not own time)"
        print(
            f"at {sdk.offered:,.0f}/s: daemon's own time p99 {own:.2f} ms{what}; "
            f"own CPU {daemon.cpu_ms() - sdk.cpu_ms():.2f} ms per call"
        )
    verdicts = []
    at_target = [d for _, d in runs if d.offered >= TARGET_RATE]
    if at_target:
        best = max(d.rate for d in at_target)
        ok = best >= 0.98 * TARGET_RATE
        verdicts.append(
            f"| daemon handles {TARGET_RATE:,.0f} send/s | {best:,.0f}/s achieved "
            f"| >= {TARGET_RATE * 0.98:,.0f}/s | {'PASS' if ok else 'MISS'} |"
        )
    kept_up = [(s, d) for s, d in runs if s.rate >= 0.98 * s.offered]
    if kept_up:
        sdk, daemon = max(kept_up, key=lambda pair: pair[0].offered)
        own = daemon.ms(0.99) - sdk.ms(0.99)
        ok = own <= TARGET_OWN_P99_MS
        verdicts.append(
            f"| daemon's own time p99 (at {sdk.offered:,.0f}/s, the highest rate the SDK "
            f"sustains here) | {own:.2f} ms | <= {TARGET_OWN_P99_MS:g} ms "
            f"| {'PASS' if ok else 'MISS'} |"
        )
    else:
        verdicts.append("| daemon's own time p99 | no offered rate the SDK sustains | | - |")
    print("\n| target | measured | limit | |\n|---|---|---|---|")
    print("\n".join(verdicts))
    print(f"done, {load()}")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


if __name__ == "__main__":
    asyncio.run(main())
