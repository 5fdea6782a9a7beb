"""Terminal client benchmarks: a huge chat, scrolling, and typing while messages pour in.

Run:  python bench/tui_bench.py            (all three; about a minute)
      python bench/tui_bench.py --messages 100000 --rate 50 --seconds 10

What is measured (headless Textual, 80x24, the real app over the real SDK):

1. open:   a chat holding N messages is opened; time until the newest page is in
           the message list and the screen has refreshed (target <= 300 ms).
2. scroll: PageUp pressed repeatedly from the bottom, loading older pages as the
           top of the render window is reached (and dropping newer ones), then
           PageDown as many times back (loading the newer pages again); per-key
           latency until the cursor moved, and how late a 10 ms timer fires
           meanwhile (the delay any input would see on top).
3. typing: a second SDK client (a separate process) sends ``--rate`` messages/s
           over a real relay to the open chat while keys are typed into the
           compose box; per-key latency until the character is in the box and
           the screen refreshed (target < 50 ms).

The 100,000-message history is written straight into the account's store as
history rows (the SDK's own row builder, ``History.row``), because sending that
many through a relay would take the bench far longer than the figure it measures.
Figures go in docs/tui.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from textual import events

from e2ee.client import DB_FILE, Client, ClientOptions
from e2ee.history import History, direct_chat_id
from e2ee.store.protocols import Changes
from e2ee.store.sqlite import SQLiteProtocolStore
from tui_client.adapter import PAGE_SIZE, Messenger
from tui_client.app import BlindpostApp
from tui_client.screens.main import MainScreen
from tui_client.widgets.conversation import ComposeArea, MessageList

FAST = ClientOptions(backoff_base=0.05, backoff_max=0.5)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _summary(name: str, ms: list[float]) -> str:
    return (
        f"{name}: n={len(ms)} p50={statistics.median(ms):.1f} ms "
        f"p95={_pct(ms, 95):.1f} ms max={max(ms):.1f} ms"
    )


async def seed(folder: Path, count: int) -> str:
    """An account with a ``count``-message chat with "bob" (no relay needed)."""
    client = await Client.create(folder, "alice", "http://127.0.0.1:9")
    await client.close()
    store = SQLiteProtocolStore.open(folder / DB_FILE, None)
    chat = direct_chat_id("bob")
    base = 1_700_000_000_000
    try:
        rows: list[Any] = [
            History.row(
                "chats",
                id=chat,
                kind="direct",
                peer="bob",
                timer_seconds=0,
                last_message_at=base + count * 1000,
                created_at=base,
            )
        ]
        for i in range(1, count + 1):
            outgoing = i % 3 == 0
            rows.append(
                History.row(
                    "messages",
                    id=f"{i:032x}",
                    chat_id=chat,
                    sender="alice" if outgoing else "bob",
                    sender_device=1,
                    outgoing=int(outgoing),
                    type="text",
                    text=f"message {i}: the quick brown fox jumps over the lazy dog",
                    counter=i,
                    sent_at=base + i * 1000,
                    received_at=base + i * 1000,
                    read_at=None if outgoing else base + i * 1000,
                    status="read" if outgoing else "received",
                    edited=0,
                    deleted=0,
                    expire_seconds=0,
                    seq=i,
                )
            )
            if len(rows) >= 5000:
                store.commit(Changes(app_rows=tuple(rows)))
                rows = []
        rows.append(History.row("counters", id="seq:messages", value=count))
        store.commit(Changes(app_rows=tuple(rows)))
    finally:
        store.close()
    return chat


class GcPauses:
    """Durations of the full (generation 2) garbage collections while measuring."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self._start = 0.0

    def start(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms.append((time.perf_counter() - self._start) * 1000)

    def line(self, what: str) -> str:
        if not self.ms:
            return f"full GC pauses {what}: none"
        return _summary(f"full GC pauses {what}", self.ms)


async def _loop_lag(lags: list[float], cpu: list[tuple[float, float]] | None = None) -> None:
    """How late a 10 ms timer fires: the delay any input would see on top.

    ``cpu`` gets (main-thread CPU ms, whole-process CPU ms) for each tick: a late
    tick with little CPU time in the main thread was waiting, for a CPU if the
    process used little either, for the GIL if other threads of it ran.
    """
    while True:
        start, start_cpu, start_all = time.perf_counter(), time.thread_time(), time.process_time()
        await asyncio.sleep(0.01)
        lags.append((time.perf_counter() - start) * 1000 - 10)
        if cpu is not None:
            cpu.append(
                (
                    (time.thread_time() - start_cpu) * 1000,
                    (time.process_time() - start_all) * 1000,
                )
            )


def _worst_ticks(lags: list[float], cpu: list[tuple[float, float]]) -> str:
    """The five latest ticks, each with the CPU time used during it."""
    worst = sorted(range(len(lags)), key=lambda i: -lags[i])[:5]
    return "worst ticks (ms late / main-thread CPU / process CPU): " + ", ".join(
        f"{lags[i]:.0f}/{cpu[i][0]:.0f}/{cpu[i][1]:.0f}" for i in worst
    )


async def _refreshed(pilot: Any) -> None:
    await pilot.pause()


async def bench_open_and_scroll(count: int, scroll_keys: int) -> list[str]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "acct"
        t0 = time.perf_counter()
        chat = await seed(folder, count)
        out.append(f"seeded {count} messages in {time.perf_counter() - t0:.1f} s")
        backend = await Messenger.open(folder, options=FAST)
        app = BlindpostApp(backend=backend)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.5)
            screen = app.screen
            assert isinstance(screen, MainScreen)
            listed = screen.query_one(MessageList)
            opens = []
            for _ in range(5):
                screen.open_chat("dm:none")
                await pilot.pause(0.2)
                start = time.perf_counter()
                screen.open_chat(chat)
                while len(listed.messages()) < PAGE_SIZE:
                    await asyncio.sleep(0.001)
                await _refreshed(pilot)
                opens.append((time.perf_counter() - start) * 1000)
            out.append(_summary(f"open chat of {count} messages (newest page shown)", opens))
            listed.focus()
            await pilot.pause(0.2)
            driver = app._driver
            assert driver is not None
            for key in ("pageup", "pagedown"):
                keys: list[float] = []
                lags: list[float] = []
                cpu: list[tuple[float, float]] = []
                widest = 0
                ticker = asyncio.create_task(_loop_lag(lags, cpu))
                pauses = GcPauses().start()
                for _ in range(scroll_keys):
                    newest = listed.messages()[-1] if listed.messages() else None
                    if key == "pagedown" and not listed.has_newer and listed.selected == newest:
                        break  # at the newest message: nothing more to scroll
                    before = (listed.highlighted, listed.selected)
                    event = events.Key(key, None)
                    event.set_sender(app)
                    start = time.perf_counter()
                    driver.send_message(event)
                    # Handled when the cursor moved (at an end of the window: when
                    # the next page is in and the cursor is back on its message).
                    while (listed.highlighted, listed.selected) == before:
                        if time.perf_counter() - start > 2:
                            break
                        await asyncio.sleep(0)
                    keys.append((time.perf_counter() - start) * 1000)
                    widest = max(widest, len(listed.messages()))
                    await asyncio.sleep(0.03)  # a fast key repeat rate
                ticker.cancel()
                pauses.stop()
                await pilot.pause(0.5)
                shown = listed.messages()
                where = f"window {shown[0].seq}-{shown[-1].seq}, at most {widest} rows"
                out.append(_summary(f"scroll: {key} x{len(keys)} ({where})", keys))
                out.append(_summary(f"event-loop lag (10 ms ticks) during {key}", lags))
                out.append("  " + _worst_ticks(lags, cpu))
                out.append(pauses.line(f"during {key}"))
    return out


# -- typing while messages arrive ------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_relay(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--data", str(data), "--set", "registration_burst=1000", "--set", "registration=open"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("relay did not start")


async def sender_main(folder: str, url: str, rate: float, seconds: float) -> None:
    """Child process: bob sends ``rate`` messages/s to alice for ``seconds``."""
    bob = await Client.create(folder, "bob", url, options=FAST)
    await bob.register()
    async with bob:
        await bob.wait_connected()
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            n += 1
            await bob.send_text("alice", f"burst message {n}", wait=False)
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.sleep(2)
    print(f"sent {n}", flush=True)


async def bench_typing(rate: float, seconds: float) -> list[str]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        relay, url = _start_relay(Path(tmp) / "relay")
        sender: subprocess.Popen[str] | None = None
        try:
            backend = await Messenger.create(Path(tmp) / "alice", "alice", url, None, options=FAST)
            sender = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--sender",
                    str(Path(tmp) / "bob"),
                    url,
                    str(rate),
                    str(seconds),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert sender.stdout is not None and sender.stdin is not None
            assert sender.stdout.readline().strip() == "ready"
            app = BlindpostApp(backend=backend)
            async with app.run_test(size=(80, 24)) as pilot:
                screen = app.screen
                while not isinstance(screen, MainScreen) or not backend.is_connected():
                    await pilot.pause(0.05)
                    screen = app.screen
                screen.open_chat(direct_chat_id("bob"))
                area = screen.query_one(ComposeArea)
                area.focus()
                await pilot.pause(0.3)
                sender.stdin.write("go\n")
                sender.stdin.flush()
                listed = screen.query_one(MessageList)
                await pilot.pause(1.0)
                keys = []
                lags: list[float] = []
                cpu: list[tuple[float, float]] = []
                ticker = asyncio.create_task(_loop_lag(lags, cpu))
                pauses = GcPauses().start()
                end = time.monotonic() + seconds - 1.5
                typed = 0
                driver = app._driver
                assert driver is not None
                while time.monotonic() < end:
                    ch = "abcdefghij"[typed % 10]
                    # As a terminal would: the driver hands the key to the app.
                    event = events.Key(ch, ch)
                    event.set_sender(app)
                    start = time.perf_counter()
                    driver.send_message(event)
                    while not area.text.endswith(ch):
                        await asyncio.sleep(0)
                    keys.append((time.perf_counter() - start) * 1000)
                    typed += 1
                    if typed % 60 == 0:
                        area.load_text("")
                    await asyncio.sleep(0.02)
                ticker.cancel()
                pauses.stop()
                await pilot.pause(2.5)
                # The list is a bounded window: the newest message tells how many came.
                newest = listed.messages()[-1].text if listed.messages() else ""
            out.append(_summary(f"keypress while {rate:g} msg/s arrive (last: {newest!r})", keys))
            out.append(_summary("event-loop lag (10 ms ticks) meanwhile", lags))
            out.append("  " + _worst_ticks(lags, cpu))
            out.append(pauses.line("meanwhile"))
        finally:
            if sender is not None:
                sender.wait(30)
            relay.terminate()
            relay.wait(15)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--scroll-keys", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sender", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        folder, url, rate, seconds = args.sender
        asyncio.run(sender_main(folder, url, float(rate), float(seconds)))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {_load()}")
    for line in asyncio.run(bench_open_and_scroll(args.messages, args.scroll_keys)):
        print(line, flush=True)
    for line in asyncio.run(bench_typing(args.rate, args.seconds)):
        print(line, flush=True)
    print(f"done, {_load()}")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


if __name__ == "__main__":
    main()
