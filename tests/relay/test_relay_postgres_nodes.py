"""Hypothesis stateful test of two PostgreSQL stores on one schema, as two relay nodes.

Random batches of sends (reused message ids, several senders, group recipients) and acks are
split between the two nodes and submitted at once, so the nodes' transactions race: unique-key
races on one message id, device-row locks on shared mailboxes, deadlocks between acks of one
group message. After every step each mailbox must hold exactly the messages the model says were
accepted, once each, in increasing seq; every queued id has one owner (another sender's reuse
is refused with ``message_id_conflict``, the owner's resend answers the first receipt); once
every recipient acked it, the id is remembered for its sender only (its resend answers the same
id and recipient count, another sender's reuse is a new message); each node keeps its own
submission order per mailbox; both nodes read the same mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from store_backends import pg_settings

from relay.errors import Conflict, RelayError
from relay.store.base import Address, Envelope, SendReceipt, StoreLimits
from relay.store.postgres import PostgresRelayStore

USERS = {"alice": [1], "bob": [1, 2], "carol": [1]}
DEVICES = [Address(u, d) for u, ds in USERS.items() for d in ds]
MIDS = [bytes([i]) * 16 for i in range(10)]


class TwoNodes(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-two-nodes-"))
        self.nodes = self.run(self.open_nodes())
        first = self.nodes[0]
        for addr in DEVICES:
            if addr.device == 1:
                self.run(first.create_account(addr, b"k" * 32, 0))
            else:
                self.run(first.add_device(addr, b"k" * 32, 0))
        self.owner: dict[bytes, Address] = {}
        self.receipt: dict[bytes, SendReceipt] = {}
        self.delivered: dict[bytes, dict[Address, SendReceipt]] = {}  # id -> {sender: receipt}
        self.mailbox: dict[Address, set[bytes]] = {a: set() for a in DEVICES}
        self.clock = 1

    async def open_nodes(self) -> list[PostgresRelayStore]:
        nodes = [
            PostgresRelayStore(pg_settings(self.dir), StoreLimits(), write_connections=2)
            for _ in range(2)
        ]
        for n in nodes:
            await n.open()
        return nodes

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @rule(
        sends=st.lists(
            st.tuples(
                st.integers(0, 1),
                st.sampled_from(DEVICES),
                st.sets(st.sampled_from(list(USERS)), min_size=1),
                st.sampled_from(MIDS),
            ),
            min_size=1,
            max_size=10,
        )
    )
    def send_batch(self, sends: list[tuple[int, Address, set[str], bytes]]) -> None:
        envs = []
        # One recipient set per id in a batch: whichever node stores it first, the mailboxes
        # it reaches are then known (only which sender wins an id is up to the race).
        users_of: dict[bytes, set[str]] = {}
        for node, sender, users, mid in sends:
            users = users_of.setdefault(mid, users)
            rcpts = tuple(a for a in DEVICES if a.user in users and a != sender)
            if rcpts:
                envs.append((node, sender, Envelope(mid, rcpts, mid[:1] + bytes([node]))))
        if not envs:
            return
        self.clock += 1

        async def go() -> list[object]:
            futs = [self.nodes[n].submit_send(s, e, self.clock) for n, s, e in envs]
            return await asyncio.gather(*futs, return_exceptions=True)

        results = self.run(go())
        won: dict[bytes, Address] = {}
        for (_, sender, env), result in zip(envs, results, strict=True):
            done = self.delivered.get(env.message_id, {}).get(sender)
            if done is not None:  # answered from the dedupe record, stored nowhere
                assert isinstance(result, SendReceipt), result
                assert (result.message_id, result.recipients) == (done[0], done[1])
                assert result.stored_at <= done.stored_at
                continue
            if isinstance(result, SendReceipt):
                known = self.owner.get(env.message_id) or won.get(env.message_id)
                assert known in (None, sender), "two owners for one id"
                first = self.receipt.setdefault(env.message_id, result)
                assert result == first, "a resend must answer the first receipt"
                if env.message_id not in self.owner and env.message_id not in won:
                    won[env.message_id] = sender
                    for r in env.recipients:
                        self.mailbox[r].add(env.message_id)
            else:
                assert isinstance(result, Conflict), result
                assert result.code == "message_id_conflict"
        for mid, sender in won.items():
            self.owner[mid] = sender
        # Each node keeps its own submission order in every mailbox it wrote.
        seq_of = {
            dev: {
                m.message_id: m.seq
                for m in self.run(self.nodes[0].fetch_mailbox(dev, 0, 1000, 10**9))
            }
            for dev in DEVICES
        }
        via = {mid: {n for n, _, e in envs if e.message_id == mid} for mid in won}
        for node in (0, 1):
            for dev in DEVICES:
                mine = [
                    e.message_id
                    for n, s, e in envs
                    if n == node
                    and dev in e.recipients
                    and won.get(e.message_id) == s
                    and via[e.message_id] == {node}
                ]
                mine = list(dict.fromkeys(mine))
                seqs = [seq_of[dev][mid] for mid in mine]
                assert seqs == sorted(seqs), "a node reordered its own sends"
        for (_, sender, env), result in zip(envs, results, strict=True):
            if isinstance(result, Conflict):
                assert self.owner.get(env.message_id) not in (None, sender)

    @rule(
        acks=st.lists(
            st.tuples(
                st.integers(0, 1),
                st.sampled_from(DEVICES),
                st.sets(st.sampled_from(MIDS), min_size=1),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def ack_batch(self, acks: list[tuple[int, Address, set[bytes]]]) -> None:
        async def go() -> list[int]:
            futs = [self.nodes[n].ack(d, sorted(p)) for n, d, p in acks]
            return list(await asyncio.gather(*futs))

        removed = self.run(go())
        expected: dict[Address, set[bytes]] = {}
        for _, dev, picks in acks:
            expected.setdefault(dev, set()).update(picks & self.mailbox[dev])
        for dev, gone in expected.items():
            self.mailbox[dev] -= gone
        assert sum(removed) == sum(len(g) for g in expected.values())
        held = set().union(*self.mailbox.values())
        for mid in [m for m in self.owner if m not in held]:  # every recipient acked
            owner = self.owner.pop(mid)
            self.delivered.setdefault(mid, {})[owner] = self.receipt.pop(mid)

    @rule()
    def restart_both(self) -> None:
        for n in self.nodes:
            self.run(n.close())
        self.nodes = self.run(self.open_nodes())

    @invariant()
    def mailboxes_match(self) -> None:
        for dev in DEVICES:
            views = [self.run(n.fetch_mailbox(dev, 0, 1000, 10**9)) for n in self.nodes]
            assert views[0] == views[1]
            ids = [m.message_id for m in views[0]]
            assert len(ids) == len(set(ids)) and set(ids) == self.mailbox[dev]
            seqs = [m.seq for m in views[0]]
            assert seqs == sorted(set(seqs))

    def teardown(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(RelayError):
                self.run(n.close())
        self.loop.close()


TwoNodes.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
TestTwoPostgresNodes = pytest.mark.usefixtures("postgres_test_dsn")(TwoNodes.TestCase)
