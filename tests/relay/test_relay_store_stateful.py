"""Hypothesis stateful test of every RelayStore backend (SQLite, PostgreSQL, in-memory twin)
against a plain model.

Random batches of concurrent sends (with reused message ids, from several senders), acks,
reads and restarts; after every step each mailbox must hold exactly the model's messages, in
order, once each. A message every recipient acked is remembered for its sender only (its
dedupe record names nobody): that sender's retry is a duplicate, another sender's reuse of the
id a new message. Sends submitted together usually share one group-commit batch, which is
where deduplication and the deferred multi-row inserts could go wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from store_backends import BACKENDS, Backend

from relay.errors import Conflict, RelayError
from relay.store.base import Address, Envelope, SendReceipt

USERS = {"alice": [1], "bob": [1, 2], "carol": [1]}
DEVICES = [Address(u, d) for u, ds in USERS.items() for d in ds]
MIDS = [bytes([i]) * 16 for i in range(12)]


class StoreMachine(RuleBasedStateMachine):
    backend: Backend

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-stateful-"))
        self.store = self.run(self.backend.open(self.dir))
        for addr in DEVICES:
            if addr.device == 1:
                self.run(self.store.create_account(addr, b"k" * 32, 0))
            else:
                self.run(self.store.add_device(addr, b"k" * 32, 0))
        self.owner: dict[bytes, Address] = {}  # message id -> sender, while queued
        self.receipts: dict[bytes, SendReceipt] = {}
        # message id -> {sender: receipt} of its delivered messages (dedupe records)
        self.delivered: dict[bytes, dict[Address, SendReceipt]] = {}
        self.mailbox: dict[Address, list[tuple[bytes, bytes]]] = {a: [] for a in DEVICES}
        self.clock = 1

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def targets(self, sender: Address, users: list[str]) -> tuple[Address, ...]:
        return tuple(a for a in DEVICES if a.user in users and a != sender)

    @rule(
        sends=st.lists(
            st.tuples(
                st.sampled_from(DEVICES),
                st.sets(st.sampled_from(list(USERS)), min_size=1),
                st.sampled_from(MIDS),
                st.binary(max_size=20),
            ),
            min_size=1,
            max_size=8,
        )
    )
    def send_batch(self, sends: list[tuple[Address, set[str], bytes, bytes]]) -> None:
        envs = []
        for sender, users, mid, body in sends:
            rcpts = self.targets(sender, sorted(users))
            if not rcpts:
                continue
            envs.append((sender, Envelope(mid, rcpts, body)))
        if not envs:
            return
        self.clock += 1

        async def go() -> list[object]:
            futs = [self.store.submit_send(s, e, self.clock) for s, e in envs]
            return await asyncio.gather(*futs, return_exceptions=True)

        results = self.run(go())
        for (sender, env), result in zip(envs, results, strict=True):
            owner = self.owner.get(env.message_id)
            done = self.delivered.get(env.message_id, {}).get(sender)
            if done is not None:  # deduplicated by the record: same id and recipient count
                assert isinstance(result, SendReceipt), result
                assert (result.message_id, result.recipients) == (done[0], done[1])
                assert result.stored_at <= done.stored_at
            elif owner is None:
                assert isinstance(result, SendReceipt), result
                self.owner[env.message_id] = sender
                self.receipts[env.message_id] = result
                for r in env.recipients:
                    self.mailbox[r].append((env.message_id, env.body))
            elif owner == sender:
                assert result == self.receipts[env.message_id]  # deduplicated, same answer
            else:
                assert isinstance(result, Conflict) and result.code == "message_id_conflict"

    @rule(
        acks=st.lists(
            st.tuples(st.sampled_from(DEVICES), st.sets(st.sampled_from(MIDS), min_size=1)),
            min_size=1,
            max_size=4,
        )
    )
    def ack_batch(self, acks: list[tuple[Address, set[bytes]]]) -> None:
        async def go() -> list[int]:
            return list(await asyncio.gather(*(self.store.ack(d, sorted(p)) for d, p in acks)))

        removed = self.run(go())
        for (dev, picks), n in zip(acks, removed, strict=True):
            before = len(self.mailbox[dev])
            self.mailbox[dev] = [(m, b) for m, b in self.mailbox[dev] if m not in picks]
            assert n == before - len(self.mailbox[dev])
        held = {m for box in self.mailbox.values() for m, _ in box}
        for mid in [m for m in self.owner if m not in held]:  # every recipient acked
            self.delivered.setdefault(mid, {})[self.owner.pop(mid)] = self.receipts.pop(mid)

    @rule()
    def restart(self) -> None:
        self.store = self.run(self.backend.restart(self.store, self.dir))

    @invariant()
    def mailboxes_match(self) -> None:
        for dev in DEVICES:
            got = self.run(self.store.fetch_mailbox(dev, 0, 1000, 10**9))
            assert [(m.message_id, m.body) for m in got] == self.mailbox[dev]
            seqs = [m.seq for m in got]
            assert seqs == sorted(set(seqs))
        assert self.store.stats().queued == sum(len(v) for v in self.mailbox.values())

    def teardown(self) -> None:
        with contextlib.suppress(RelayError):
            self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


SETTINGS = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    # No explain phase: its tracing makes shrinking a failure take minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


def _machine(backend: Backend) -> type[StoreMachine]:
    cls = type(f"StoreMachine_{backend.name}", (StoreMachine,), {"backend": backend})
    cls.TestCase.settings = SETTINGS
    return cls


TestSqliteStoreMachine = _machine(BACKENDS[0]).TestCase
TestMemoryStoreMachine = _machine(BACKENDS[1]).TestCase
# Each example's store works in a schema of its own inside the session's database.
TestPostgresStoreMachine = pytest.mark.usefixtures("postgres_test_dsn")(
    _machine(BACKENDS[2]).TestCase
)
