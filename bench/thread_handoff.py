"""What one hand-off between two Python threads costs on this machine, in CPU.

    python bench/thread_handoff.py --round-trips 20000 --runs 3

Two threads pass a semaphore back and forth: each round trip puts each thread to sleep once
and wakes it once (two context switches). Printed per run: wall time and CPU time (user +
system, the whole process) per round trip, context switches per round trip, and CPU per
switch. The relay's threads (event loop, SQLite writer, log sync) hand work to each other and
wait for the GIL in the same way, so the relay's context switches a message
(``bench/relay_load.py`` prints them) times this figure is what its hand-offs cost it
(docs/performance-relay.md, "Issue 16: the floor under the relay").
"""

# Invariant: it measures and prints; it asserts nothing.

from __future__ import annotations

import argparse
import resource
import threading
import time


def one_run(round_trips: int) -> tuple[float, float, float]:
    """Return (wall us, CPU us, context switches) per round trip."""
    ping, pong = threading.Semaphore(0), threading.Semaphore(0)

    def other() -> None:
        for _ in range(round_trips):
            ping.acquire()
            pong.release()

    thread = threading.Thread(target=other)
    thread.start()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.perf_counter()
    for _ in range(round_trips):
        ping.release()
        pong.acquire()
    thread.join()
    w1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    switches = (r1.ru_nvcsw - r0.ru_nvcsw) + (r1.ru_nivcsw - r0.ru_nivcsw)
    return 1e6 * (w1 - w0) / round_trips, 1e6 * cpu / round_trips, switches / round_trips


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--round-trips", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    for i in range(1, args.runs + 1):
        wall, cpu, switches = one_run(args.round_trips)
        per_switch = cpu / switches if switches else float("nan")
        print(
            f"run {i}: {args.round_trips} round trips: wall {wall:.1f} us, CPU {cpu:.1f} us,"
            f" {switches:.2f} context switches a round trip: {per_switch:.1f} us of CPU a switch",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
