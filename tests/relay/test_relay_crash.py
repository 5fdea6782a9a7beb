"""Crash safety: SIGKILL the relay at random moments while clients exchange messages.

What a user relies on (docs/relay-api.md sections 4-5): a message the relay answered with
200 (HTTP) or ``send_result`` 200 (WebSocket) survives any crash and reaches its recipient
device; a message the client acknowledged (``acked`` received) is never delivered again; a
mailbox is delivered in increasing ``seq``.

Definitions checked here, over every relay incarnation:

* lost: acknowledged by the relay with 200, never delivered by the end;
* duplicated: delivered again after the recipient's ack of it was confirmed (redelivery of
  an *unacknowledged* message after a reconnect is the protocol working as designed), or
  the same id stored twice in one mailbox: two different ``seq`` for one id from one relay
  incarnation, or from two when the sender's 200 for it had come before the first was seen.
  (The relay pushes a message to an online recipient before its commit: a copy pushed by an
  incarnation killed before that commit was never stored, its sender got no 200 and resends
  it with the same id, so the recipient sees it again with a new seq; the SDK drops the copy
  by its id. docs/delivery.md);
* out of order: a ``seq`` not above the previous one on the same connection, or a message
  seen for the first time with a ``seq`` below one already seen (it was committed earlier
  but held back);
* corrupted: a delivery whose id or body the sender never sent.

Senders retry unanswered sends with the same message id after reconnecting (idempotent
sends), so each message is eventually answered 200. Randomness is seeded; the chaos phase
is bounded by count and time and the relay runs on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from relay_harness import RelayProcess
from relay_testclient import Device, RelayClient, b64, drain_until_empty, new_username, unb64

from relay.store.base import Envelope
from relay.wire import decode_deliver, encode_send

SEED = 20261128
N_CLIENTS = 20
MIN_MESSAGES = 5000  # the chaos phase aims at this many answered sends...
FLOOR_MESSAGES = 1000  # ...and on a slow machine settles for this many once CHAOS_BUDGET_S passed
MIN_KILLS = 10  # always reached, however slow the machine
CHAOS_BUDGET_S = 60.0
CHAOS_CEILING_S = 400.0  # the test fails if the floor is not reached by then
SETTLE_BUDGET_S = 120.0  # a ceiling: settling ends as soon as everything is answered
UPTIME_S = (0.3, 2.0)  # a kill lands at a uniformly random moment in this window after start
SEND_PAUSE_S = 0.02
WINDOW = 8  # pipelined WebSocket sends per client
HTTP_EVERY = 5  # every 5th new message goes over PUT /v1/messages instead of the socket
ACK_FLUSH_S = 0.03

pytestmark = pytest.mark.slow


@dataclass
class Mailbox:
    """What one recipient device has seen, across every connection."""

    seq_of: dict[bytes, int] = field(default_factory=dict)
    # (id, relay incarnation) -> the seq it came with from that incarnation
    seq_in: dict[tuple[bytes, int], int] = field(default_factory=dict)
    first_in: dict[bytes, int] = field(default_factory=dict)  # id -> incarnation first seen
    last_first_seen: int = 0
    ack_confirmed: set[bytes] = field(default_factory=set)
    deliveries: int = 0


@dataclass
class Peer:
    dev: Device
    bodies: dict[bytes, tuple[str, bytes]] = field(default_factory=dict)  # mid -> (to, body)
    confirmed: set[bytes] = field(default_factory=set)
    confirmed_in: dict[bytes, int] = field(default_factory=dict)  # id -> incarnation of its 200
    retry: list[bytes] = field(default_factory=list)
    mailbox: Mailbox = field(default_factory=Mailbox)
    counter: int = 0
    # The live connection's acks not yet sent, and sent but not yet answered (by ref).
    to_ack: list[bytes] = field(default_factory=list)
    refs: dict[str, list[bytes]] = field(default_factory=dict)


class Chaos:
    """Shared state of the run: the current relay, peers, and every violation found."""

    def __init__(self, peers: list[Peer], rng: random.Random) -> None:
        self.peers = peers
        self.by_user = {p.dev.user: p for p in peers}
        self.rng = rng
        self.url = ""
        self.incarnation = 0  # which relay process is up (counts restarts)
        self.up = asyncio.Event()
        self.stop_sending = asyncio.Event()
        self.done = asyncio.Event()
        self.violations: list[str] = []
        self.stats: Counter[str] = Counter()

    def violation(self, text: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(text)
        self.stats["violations"] += 1

    # -- receiving ---------------------------------------------------------------------

    def confirm(self, me: Peer, mid: bytes, incarnation: int) -> None:
        me.confirmed.add(mid)
        me.confirmed_in.setdefault(mid, incarnation)

    def on_deliver(
        self, me: Peer, data: bytes, session_last: list[int], incarnation: int
    ) -> bytes | None:
        msg = decode_deliver(data)
        box = me.mailbox
        box.deliveries += 1
        mid, seq = msg.message_id, msg.seq
        sender = self.by_user.get(msg.sender.user)
        sent = sender.bodies.get(mid) if sender is not None else None
        if sent is None or sent != (me.dev.user, msg.body):
            self.violation(f"corrupted or unknown delivery to {me.dev.user} seq {seq}")
            return None
        if seq <= session_last[0]:
            self.violation(f"{me.dev.user}: seq {seq} after {session_last[0]} on one connection")
        session_last[0] = max(session_last[0], seq)
        if mid in box.ack_confirmed:
            self.violation(f"{me.dev.user}: {b64(mid)} delivered again after its ack committed")
        known = box.seq_of.get(mid)
        here = box.seq_in.setdefault((mid, incarnation), seq)
        if known is None:
            if seq <= box.last_first_seen:
                self.violation(
                    f"{me.dev.user}: new message seq {seq} after seq {box.last_first_seen}"
                )
            box.last_first_seen = max(box.last_first_seen, seq)
            box.seq_of[mid] = seq
            box.first_in[mid] = incarnation
        elif here != seq:
            self.violation(f"{me.dev.user}: {b64(mid)} stored twice (seq {here} and {seq})")
        elif known != seq:
            # First seen from an earlier incarnation with another seq: legitimate only if that
            # copy was pushed before a commit the crash prevented (no 200 had come by then).
            first = box.first_in[mid]
            answered = sender.confirmed_in.get(mid) if sender is not None else None
            if answered is not None and answered <= first:
                self.violation(f"{me.dev.user}: {b64(mid)} stored twice (seq {known} and {seq})")
            self.stats["resent_after_early_push"] += 1
        else:
            self.stats["redelivered_unacked"] += 1
        return mid

    # -- one client --------------------------------------------------------------------

    async def run_client(self, me: Peer, http: aiohttp.ClientSession) -> None:
        client = RelayClient("", http)
        while not self.done.is_set():
            await self.up.wait()
            client.base = self.url
            incarnation = self.incarnation
            try:
                ws = await client.ws(me.dev, heartbeat=None)
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.05)
                continue
            self.stats["connections"] += 1
            try:
                await self.session(me, client, ws, incarnation)
            finally:
                await ws.close()

    async def session(
        self,
        me: Peer,
        client: RelayClient,
        ws: aiohttp.ClientWebSocketResponse,
        incarnation: int,
    ) -> None:
        inflight: dict[bytes, None] = {}
        window = asyncio.Semaphore(WINDOW)
        to_ack: list[bytes] = []
        refs: dict[str, list[bytes]] = {}
        me.to_ack, me.refs = to_ack, refs
        session_last = [0]
        live = asyncio.Event()

        async def reader() -> None:
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    mid = self.on_deliver(me, msg.data, session_last, incarnation)
                    if mid is not None:
                        to_ack.append(mid)  # processed: only now may it be acknowledged
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    doc = json.loads(msg.data)
                    kind = doc.get("type")
                    if kind == "send_result":
                        mid = unb64(doc["id"])
                        inflight.pop(mid, None)
                        window.release()
                        if doc["status"] == 200:
                            self.confirm(me, mid, incarnation)
                        else:
                            self.stats[f"send_result_{doc['status']}"] += 1
                            if doc["status"] >= 500:
                                self.violation(f"send_result {doc}")
                            me.retry.append(mid)
                    elif kind == "acked":
                        me.mailbox.ack_confirmed.update(refs.pop(doc["ref"], ()))
                    elif kind == "empty":
                        live.set()
                    elif kind == "error":
                        self.violation(f"error frame {doc}")
                else:
                    return

        async def acker() -> None:
            n = 0
            while True:
                await asyncio.sleep(ACK_FLUSH_S)
                if to_ack:
                    ids, to_ack[:] = list(to_ack[:1000]), to_ack[1000:]
                    n += 1
                    ref = f"r{n}"
                    refs[ref] = ids
                    await ws.send_str(
                        json.dumps({"type": "ack", "ids": [b64(i) for i in ids], "ref": ref})
                    )

        async def sender() -> None:
            await live.wait()
            while True:
                if me.retry:
                    mid = me.retry.pop(0)
                    self.stats["retries"] += 1
                elif self.stop_sending.is_set():
                    await asyncio.sleep(0.05)
                    continue
                else:
                    mid = self.new_message(me)
                to_user, body = me.bodies[mid]
                to_dev = self.by_user[to_user].dev
                if me.counter % HTTP_EVERY == 0 and mid not in inflight:
                    await self.send_http(me, client, to_dev, mid, body, incarnation)
                else:
                    await window.acquire()
                    inflight[mid] = None
                    await ws.send_bytes(encode_send(Envelope(mid, (to_dev.addr,), body)))
                await asyncio.sleep(SEND_PAUSE_S)

        tasks = [asyncio.ensure_future(t()) for t in (reader, acker, sender)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Unanswered sends have an unknown outcome: resend them with the same id.
            me.retry.extend(m for m in inflight if m not in me.confirmed)

    def new_message(self, me: Peer) -> bytes:
        me.counter += 1
        to = self.rng.choice([p for p in self.peers if p is not me])
        mid = os.urandom(16)
        me.bodies[mid] = (to.dev.user, f"{me.dev.user}#{me.counter}".encode() + os.urandom(8))
        return mid

    async def send_http(
        self, me: Peer, client: RelayClient, to: Device, mid: bytes, body: bytes, incarnation: int
    ) -> None:
        try:
            reply = await client.send_binary(me.dev, [to], body, mid)
        except (aiohttp.ClientError, OSError, TimeoutError):
            me.retry.append(mid)
            return
        if reply.status == 200:
            self.confirm(me, mid, incarnation)
            return
        self.stats[f"http_{reply.status}"] += 1
        if reply.status >= 500:
            self.violation(f"HTTP send answered {reply.status}: {reply.body[:200]!r}")
        me.retry.append(mid)

    # -- bookkeeping -------------------------------------------------------------------

    def confirmed_total(self) -> int:
        return sum(len(p.confirmed) for p in self.peers)

    def outstanding(self) -> tuple[int, int, int]:
        """(sends awaiting retry, answered but undelivered, delivered but ack unconfirmed)."""
        retry = sum(len(p.retry) for p in self.peers)
        undelivered = unacked = 0
        for p in self.peers:
            for mid in p.confirmed:
                box = self.by_user[p.bodies[mid][0]].mailbox
                if mid not in box.seq_of:
                    undelivered += 1
                elif mid not in box.ack_confirmed:
                    unacked += 1
        return retry, undelivered, unacked

    def settled(self) -> bool:
        # An ack whose "acked" answer was lost in a crash may be committed (then the relay
        # rightly never redelivers it); the final empty-mailbox check covers those.
        retry, undelivered, _ = self.outstanding()
        acks_pending = any(p.to_ack or p.refs for p in self.peers)
        return retry == 0 and undelivered == 0 and not acks_pending


async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "crash-relay"
    relays = [await asyncio.to_thread(relay_factory, None, data_dir)]
    timeout = aiohttp.ClientTimeout(total=10, sock_connect=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        reg = RelayClient(relays[0].url, http)
        peers = [Peer(Device(new_username("crash"))) for _ in range(N_CLIENTS)]
        for p in peers:
            assert (await reg.register(p.dev)).status == 201
        chaos = Chaos(peers, rng)
        chaos.url = relays[0].url
        chaos.up.set()
        clients = [asyncio.ensure_future(chaos.run_client(p, http)) for p in peers]
        kills = 0
        started = time.monotonic()
        try:
            while kills < MIN_KILLS or chaos.confirmed_total() < MIN_MESSAGES:
                # Amounts, not time, end the chaos: on a busy machine it runs longer.
                elapsed = time.monotonic() - started
                enough = kills >= MIN_KILLS and chaos.confirmed_total() >= FLOOR_MESSAGES
                if (elapsed > CHAOS_BUDGET_S and enough) or elapsed > CHAOS_CEILING_S:
                    break
                await asyncio.sleep(rng.uniform(*UPTIME_S))
                relays[-1].proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(relays[-1].proc.wait, 10)
                chaos.up.clear()
                chaos.incarnation += 1
                kills += 1
                relays.append(await asyncio.to_thread(relay_factory, None, data_dir))
                chaos.url = relays[-1].url
                chaos.up.set()
            chaos_s = time.monotonic() - started
            # Let every retry be answered and every delivery be acknowledged, then stop.
            chaos.stop_sending.set()
            deadline = time.monotonic() + SETTLE_BUDGET_S
            while not chaos.settled() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            settled = chaos.settled()
            outstanding = chaos.outstanding()
        finally:
            chaos.done.set()
            for c in clients:
                c.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

        # A fresh connection per device finds an empty mailbox: nothing is left behind.
        final = RelayClient(relays[-1].url, http)
        leftovers = 0
        for p in peers:
            ws = await final.ws(p.dev)
            rest = await drain_until_empty(ws)
            leftovers += len(rest)
            for m in rest:
                if m.message_id in p.mailbox.ack_confirmed:
                    chaos.violation(f"{p.dev.user}: acked {b64(m.message_id)} still queued")
            await ws.close()

    confirmed = chaos.confirmed_total()
    lost = [
        (p.dev.user, b64(mid))
        for p in peers
        for mid in p.confirmed
        if mid not in chaos.by_user[p.bodies[mid][0]].mailbox.seq_of
    ]
    tracebacks = [i for i, r in enumerate(relays) if "Traceback" in r.log_text()]
    print(
        f"\ncrash run: {kills} SIGKILLs in {chaos_s:.1f} s, {confirmed} messages answered 200,"
        f" {sum(p.mailbox.deliveries for p in peers)} deliveries, stats {dict(chaos.stats)},"
        f" outstanding at the end (retry, undelivered, ack answer lost) {outstanding}"
    )
    assert kills >= MIN_KILLS
    assert confirmed >= FLOOR_MESSAGES
    assert settled, f"outstanding (retry, undelivered, ack unconfirmed): {outstanding}"
    assert lost == [], f"{len(lost)} acknowledged messages lost, e.g. {lost[:5]}"
    assert chaos.violations == [], chaos.violations
    assert leftovers == 0
    assert tracebacks == [], relays[tracebacks[0]].log_text()[-3000:] if tracebacks else ""
