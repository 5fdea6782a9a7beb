"""Terminal client benchmarks: opening a huge chat, scrolling, typing while messages pour in.

Run:  python bench/tui_bench.py                 (all three; about 1.5 minutes)
      python bench/tui_bench.py --only open     (open + scroll; --only typing: typing)
      python bench/tui_bench.py --messages 100000 --opens 10 --rate 50 --seconds 10

Issue 18's targets, measured end to end as a person sees them: ``blindpost`` (the real
app, Textual's real terminal driver, its input and output threads) runs in a
pseudo-terminal at 80x24; the bench writes keys into the terminal as a keyboard would
and reads the app's output with a terminal emulator (pyte). A figure runs from the
moment the key's bytes were written to the moment the output that makes the screen show
the result was read (a reader thread stamps each chunk when it arrives; parsing it is not
counted). This replaces polling a tmux pane, whose polling interval adds to what it
measures.

1. open:   an account whose chat with bob holds N messages (and carol's, one message)
           written straight into its SQLite store; ``--opens`` times: Ctrl+K, "bob",
           and from Enter until bob's newest message is on screen (carol's chat is
           opened in between). Target: p95 <= 300 ms.
2. typing: a real relay process; bob's client, a separate process, sends ``--rate``
           messages/s to alice for ``--seconds`` while keys are typed into alice's
           compose box (about 30 keys/s); per key, until the compose box on screen
           shows the text typed so far. Target: p95 <= 50 ms.
3. scroll: (not an issue 18 target) PageUp / PageDown through the big chat in
           process with Textual's Pilot: per key until the cursor moved, how late a
           10 ms timer fires meanwhile, and full GC pauses.

The 100,000-message history is written straight into the account's store as history
rows (the SDK's own row builder, ``History.row``), because sending that many through a
relay would take far longer than the figure it measures. Every figure line carries the
load average; a table with PASS/MISS against the targets ends the output. Figures go in
docs/tui.md.
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
from collections import Counter
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
from tui_client.widgets.conversation import MessageList

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
    """An account with a ``count``-message chat with "bob" and a one-message chat with
    "carol" (no relay needed); returns bob's chat id."""
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
        for i in range(1, count + 2):
            outgoing = i % 3 == 0
            other = i == count + 1  # carol's one message, the newest of all
            rows.append(
                History.row(
                    "messages",
                    id=f"{i:032x}",
                    chat_id=direct_chat_id("carol") if other else chat,
                    sender="carol" if other else "alice" if outgoing else "bob",
                    sender_device=1,
                    outgoing=int(outgoing and not other),
                    type="text",
                    text=CAROL_TEXT if other else f"message {i}: {FILLER}",
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
        rows.append(
            History.row(
                "chats",
                id=direct_chat_id("carol"),
                kind="direct",
                peer="carol",
                timer_seconds=0,
                last_message_at=base + (count + 1) * 1000,
                created_at=base,
            )
        )
        rows.append(History.row("counters", id="seq:messages", value=count + 1))
        store.commit(Changes(app_rows=tuple(rows)))
    finally:
        store.close()
    return chat


CAROL_TEXT = "carol's only message"
FILLER = "the quick brown fox jumps over the lazy dog"
BLINDPOST = Path(sys.executable).parent / "blindpost"
CTRL_K, CTRL_N, CTRL_Q, ENTER, BACKSPACE = b"\x0b", b"\x0e", b"\x11", b"\r", b"\x7f"


class Terminal:
    """``blindpost`` (the real app, real terminal driver) in a pseudo-terminal, its output
    read by a terminal emulator (pyte), as a person's terminal would show it.

    A reader thread stamps every chunk of output with the time it was read, so a frame's
    time is when its bytes reached the terminal, not when this process got round to
    parsing them (parsing happens in the caller's thread).
    """

    def __init__(self, data: Path, env: dict[str, str], size: tuple[int, int] = (80, 24)):
        import fcntl
        import pty
        import struct
        import termios
        import threading

        import pyte

        cols, rows = size
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            [str(BLINDPOST), "--data", str(data)],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.screen = pyte.Screen(cols, rows)
        self._stream = pyte.ByteStream(self.screen)
        self._chunks: list[tuple[float, bytes]] = []
        self.bytes_read = 0
        self.parse_seconds = 0.0
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:
                return
            if not data:
                return
            stamp = time.perf_counter()
            with self._lock:
                self._chunks.append((stamp, data))
            self._arrived.set()

    def type(self, data: bytes) -> float:
        """Write keys as a terminal would; the time they were written."""
        stamp = time.perf_counter()
        os.write(self.master, data)
        return stamp

    def wait_for(self, shown: Any, timeout: float = 30.0) -> float:
        """Parse output until ``shown(lines)`` holds; the time that frame was read.

        Raises:
            TimeoutError: not shown within ``timeout`` seconds (the screen is in the message).
        """
        deadline = time.perf_counter() + timeout
        while True:
            with self._lock:
                chunks, self._chunks = self._chunks, []
                self._arrived.clear()
            for i, (stamp, data) in enumerate(chunks):
                began = time.perf_counter()
                self._stream.feed(data)
                self.parse_seconds += time.perf_counter() - began
                self.bytes_read += len(data)
                if shown(self.screen.display):
                    with self._lock:  # what came after it is parsed by the next call
                        self._chunks[:0] = chunks[i + 1 :]
                    return stamp
            if not chunks and shown(self.screen.display):
                return time.perf_counter()
            if time.perf_counter() > deadline:
                raise TimeoutError("not shown; the screen:\n" + "\n".join(self.screen.display))
            self._arrived.wait(0.005)  # for output, or to look at the clock again

    def settle(self, seconds: float) -> None:
        """Keep reading for ``seconds`` (the app redraws; nothing is measured)."""
        end = time.perf_counter() + seconds
        self.wait_for(lambda _lines: time.perf_counter() > end, seconds + 30)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        try:
            self.type(CTRL_Q)
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


def _app_env(tmp: Path) -> dict[str, str]:
    """The app's environment: a terminal, settings of its own (defaults), no notifier."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLINDPOST_")}
    env.update(
        TERM="xterm-256color",
        COLORTERM="truecolor",
        XDG_CONFIG_HOME=str(tmp / "config"),
        PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",
    )
    return env


def _pane(lines: list[str]) -> list[str]:
    """The conversation pane: each line right of the chat list's border."""
    # "▕", the chat list's right border: where most lines have it (a toast or a
    # dialog may cover some), so the chat list's previews never count as shown.
    edges = Counter(line.find("\u2595") for line in lines)
    edges.pop(-1, None)
    edge = edges.most_common(1)[0][0] if edges else len(lines[0])
    return [line[edge + 1 :] for line in lines]


def _switch_to(term: Terminal, name: str) -> float:
    """Ctrl+K, the chat's name, then Enter; the time Enter was typed."""
    term.type(CTRL_K)
    term.settle(0.3)
    term.type(name.encode())
    term.settle(0.3)
    return term.type(ENTER)


def bench_open(folder: Path, tmp: Path, count: int, opens: int) -> list[float]:
    """Open bob's ``count``-message chat ``opens`` times (carol's in between), from the
    Enter in the quick switcher to the frame showing bob's newest message."""
    newest = f"message {count}: "
    term = Terminal(folder, _app_env(tmp))
    try:
        term.wait_for(lambda lines: any("@bob" in line for line in lines))
        term.settle(1.0)
        ms = []
        for _ in range(opens):
            start = _switch_to(term, "carol")
            term.wait_for(lambda lines: any(CAROL_TEXT in line for line in _pane(lines)))
            term.settle(0.3)
            start = _switch_to(term, "bob")
            shown = term.wait_for(lambda lines: any(newest in line for line in _pane(lines)))
            ms.append((shown - start) * 1000)
            term.settle(0.3)
    finally:
        term.close()
    return ms


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


async def bench_scroll(folder: Path, chat: str, scroll_keys: int) -> list[str]:
    """PageUp / PageDown through the seeded chat, in process (headless Pilot)."""
    out = []
    backend = await Messenger.open(folder, options=FAST)
    app = BlindpostApp(backend=backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.5)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        listed = screen.query_one(MessageList)
        screen.open_chat(chat)
        while len(listed.messages()) < PAGE_SIZE:
            await asyncio.sleep(0.001)
        await _refreshed(pilot)
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


def bench_typing(rate: float, seconds: float) -> tuple[list[float], str]:
    """Type into the compose box while bob's process sends ``rate`` messages/s to it over
    a real relay; per key, from writing it to the terminal to the frame that shows it."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        relay, url = _start_relay(tmp / "relay")
        sender: subprocess.Popen[str] | None = None
        term: Terminal | None = None
        try:
            env = _app_env(tmp)
            subprocess.run(
                [str(BLINDPOST), "--data", str(tmp / "alice"), "init", "alice", "--relay", url],
                check=True, env=env, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            sender = subprocess.Popen(
                [sys.executable, __file__, "--sender", str(tmp / "bob"), url, str(rate),
                 str(seconds)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert sender.stdout is not None and sender.stdin is not None
            assert sender.stdout.readline().strip() == "ready"
            term = Terminal(tmp / "alice", env)
            term.wait_for(lambda lines: "connected" in lines[0] and "reconnecting" not in lines[0])
            term.type(CTRL_N)
            term.settle(0.5)
            term.type(b"bob")
            term.settle(0.3)
            term.type(ENTER)
            term.wait_for(lambda lines: "@bob" in _pane(lines)[1])
            # Where the compose box shows its text: type a marker, find it, erase it.
            term.type(b"zqzq")
            term.wait_for(lambda lines: any("zqzq" in line for line in lines))
            row = next(i for i, line in enumerate(term.screen.display) if "zqzq" in line)
            col = term.screen.display[row].index("zqzq")
            term.type(BACKSPACE * 4)
            term.wait_for(lambda lines: "zqzq" not in lines[row])
            sender.stdin.write("go\n")
            sender.stdin.flush()
            term.settle(1.0)
            cpu_before, began = term.cpu_seconds(), time.perf_counter()
            read_before, parse_before = term.bytes_read, term.parse_seconds
            keys: list[float] = []
            typed = ""
            end = time.monotonic() + seconds - 1.5
            while time.monotonic() < end:
                typed += "abcdefghij"[len(typed) % 10]
                want = typed + " "

                def shown(lines: list[str], want: str = want) -> bool:
                    return lines[row][col : col + len(want)] == want

                start = term.type(typed[-1].encode())
                keys.append((term.wait_for(shown, 10) - start) * 1000)
                term.settle(0.02)  # a fast typist: about 30 keys/s with the wait
                if len(typed) == 40:
                    term.type(BACKSPACE * 40)
                    term.wait_for(lambda lines: lines[row][col : col + 10].strip() == "")
                    typed = ""
            took = time.perf_counter() - began
            cpu = (term.cpu_seconds() - cpu_before) / took
            output = (term.bytes_read - read_before) / took / 1024
            parse = (term.parse_seconds - parse_before) / took
            term.settle(2.5)
            last = next(
                (
                    line.strip()
                    for line in reversed(_pane(term.screen.display))
                    if "burst message" in line
                ),
                "",
            )
            note = f"app CPU {cpu:.0%} of one core, output {output:.0f} KiB/s"
            note += f" (the emulator parsing it: {parse:.0%} of a core); newest shown: {last!r}"
            return keys, note
        finally:
            if term is not None:
                term.close()
            if sender is not None:
                sender.wait(30)
            relay.terminate()
            relay.wait(15)


#: Issue 18's targets: (measure, milliseconds at p95).
TARGETS = {"open": 300.0, "typing": 50.0}


def _row(name: str, ms: list[float], target: float | None) -> str:
    p95 = _pct(ms, 95)
    verdict = "" if target is None else ("PASS" if p95 <= target else "MISS")
    limit = "" if target is None else f"<= {target:g}"
    return (
        f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p95:.1f} | {max(ms):.1f} "
        f"| {limit} | {verdict} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--opens", type=int, default=10)
    parser.add_argument("--scroll-keys", type=int, default=200, help="0: no scroll measure")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--only", choices=("open", "typing"), help="one measure (open includes scroll)"
    )
    parser.add_argument("--sender", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        folder, url, rate, seconds = args.sender
        asyncio.run(sender_main(folder, url, float(rate), float(seconds)))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {_load()}", flush=True)
    table = []
    if args.only != "typing":
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            t0 = time.perf_counter()
            chat = asyncio.run(seed(tmp / "acct", args.messages))
            print(f"seeded {args.messages} messages in {time.perf_counter() - t0:.1f} s")
            opens = bench_open(tmp / "acct", tmp, args.messages, args.opens)
            print(_summary("open (Enter to newest message on screen)", opens), f"[{_load()}]")
            name = f"open a {args.messages:,}-message chat: Enter to frame"
            table.append(_row(name, opens, TARGETS["open"]))
            if args.scroll_keys:
                for line in asyncio.run(bench_scroll(tmp / "acct", chat, args.scroll_keys)):
                    print(line, flush=True)
    if args.only != "open":
        keys, note = bench_typing(args.rate, args.seconds)
        print(_summary(f"keypress to frame while {args.rate:g} msg/s arrive", keys), f"[{_load()}]")
        print(f"  {note}")
        name = f"keypress to frame, {args.rate:g} msg/s arriving"
        table.append(_row(name, keys, TARGETS["typing"]))
    print(
        "\n| measure (ms) | n | p50 | p95 | max | target (p95) | |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(table))
    print(f"done, {_load()}")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


if __name__ == "__main__":
    main()
