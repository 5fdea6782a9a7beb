"""SDK benchmarks against a real relay process on loopback; prints figures.

Run: ``python bench/sdk_bench.py [--messages 10000] [--members 100] [--file-mb 100]
[--passphrase TEXT]``

Not a test (pytest does not collect it): it prints what it measured, for
docs/sdk.md. Three figures, as issue 4 asks:

* inbox: one client comes online to N queued messages; messages/s decrypted,
  stored (history row + session state, committed in group-commit transactions
  before the acks) and acknowledged, and how many store transactions it took.
  With ``--passphrase`` every account's store is encrypted (SQLCipher) and the
  line ends in PASS or MISS against the 1,500 messages/s target of issue 17
  (without it, against issue 4's 1,000);
* group send: client time of one text to a group of M members once Sender Keys
  are distributed (encrypt once + one relay send to every member device);
* media: a file of F MB, encrypt+upload and download+decrypt, MB/s, and the
  process's peak RSS growth (flat memory).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import e2ee  # noqa: E402, F401
from e2ee import envelope, payload  # noqa: E402
from e2ee.client import Client, ClientOptions  # noqa: E402
from e2ee.events import MessageReceived  # noqa: E402
from e2ee.store.protocols import Address  # noqa: E402
from e2ee.store.sealing import KdfLimits  # noqa: E402
from e2ee.transport.ws import RelayConnection  # noqa: E402

FAST_KDF = KdfLimits(opslimit=1, memlimit=8192)
OPTIONS = ClientOptions(backoff_base=0.05, backoff_max=0.5)


def start_relay(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "relay", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--data", str(data)]
    for setting in (
        "registration_burst=100000",
        "prekey_fetch_burst=100000",
        "send_burst=1000000",
        "send_rate=1000000",
        "account_send_burst=1000000",
        "account_send_rate=1000000",
        "account_max_inflight_sends=1000000",
        "mailbox_max_messages=100000",
        # Not what is measured: accounts without a proof of work, one sender's queue of
        # 10,000 messages to one stranger, bundle fetches of a 100-member group.
        "registration=open",
        "mailbox_sender_max_messages=100000",
        "mailbox_stranger_max_messages=100000",
        "prekey_fetch_account_burst=100000",
        "prekey_target_burst=100000",
    ):
        args += ["--set", setting]
    log = (data / "relay.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit("relay did not start: " + (data / "relay.log").read_text())


#: Inbox drain targets, messages/s: issue 4 (plain store), issue 17 (SQLCipher on).
INBOX_TARGET = 1_000
INBOX_TARGET_ENCRYPTED = 1_500


async def new_client(root: Path, url: str, name: str, passphrase: str | None = None) -> Client:
    client = await Client.create(
        root / name, name, url, passphrase=passphrase, kdf_limits=FAST_KDF, options=OPTIONS
    )
    await client.register()
    return client


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


async def bench_inbox(root: Path, url: str, count: int, passphrase: str | None = None) -> None:
    alice = await new_client(root, url, "inbox_alice", passphrase)
    bob = await new_client(root, url, "inbox_bob", passphrase)
    # Alice's outbox would send these one by one; to set up quickly, encrypt with
    # her engine and pipeline the sends on her connection (same bytes on the wire).
    # An established conversation: one message each way, so the backlog is
    # normal ratchet messages (a first contact's backlog would be prekey messages).
    b_events = bob.events()
    async with alice, bob:
        await alice.send_text("inbox_bob", "warm-up")
        async for event in b_events:
            if isinstance(event, MessageReceived):
                break
        await bob.send_text("inbox_alice", "reply")
    bob = await Client.open(root / "inbox_bob", passphrase, options=OPTIONS)
    alice = await Client.open(root / "inbox_alice", passphrase, options=OPTIONS)
    async with alice:
        await alice.wait_connected()
        await asyncio.sleep(0.2)  # the reply arrives: alice's session is confirmed
        engine = alice._engine
        bob_addr = Address("inbox_bob", 1)
        conn = RelayConnection.from_client(alice._link._http(url), reconnect=False)  # type: ignore[attr-defined]
        await conn.start()
        await conn.wait_connected()
        futures = []
        for i in range(count):
            mid = os.urandom(16)
            body = payload.encode(
                payload.Payload(
                    payload.PayloadType.TEXT,
                    mid,
                    int(time.time() * 1000),
                    counter=i + 3,
                    text=f"queued message {i}",
                )
            )
            ct = await asyncio.to_thread(engine.encrypt, bob_addr, body)
            env = envelope.build_pairwise([envelope.Entry("inbox_bob", 1, ct.kind, ct.body)])
            futures.append(await conn.send(mid, [("inbox_bob", 1)], env))
            if len(futures) >= 200:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        await conn.close()
    events = bob.events()
    received = 0
    transactions = bob._store.transaction_count
    load_before = load()
    cpu = time.process_time()
    start = time.perf_counter()
    async with bob:
        async for event in events:
            if isinstance(event, MessageReceived):
                received += 1
                if received == count:
                    break
        await bob._inbox.flush_acks()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        transactions = bob._store.transaction_count - transactions
    rate = count / elapsed
    encrypted = bob._store.encrypted
    target = INBOX_TARGET_ENCRYPTED if encrypted else INBOX_TARGET
    print(
        f"inbox ({'SQLCipher on' if encrypted else 'plain store'}): {count} queued messages "
        f"decrypted, stored and acknowledged in {elapsed:.2f} s = {rate:,.0f} messages/s "
        f"({transactions} store transactions); target >= {target:,}: "
        f"{'PASS' if rate >= target else 'MISS'}"
    )
    print(
        f"  client CPU {cpu / count * 1e6:.0f} us/message; {load_before} before, {load()} "
        "after (2+ on 2 cores: oversubscribed)"
    )


async def bench_group(root: Path, url: str, members: int, rounds: int = 20) -> None:
    owner = await new_client(root, url, "group_owner")
    names = []
    for i in range(members):
        member = await new_client(root, url, f"group_m{i:03d}")
        names.append(member.username)
        await member.close()
    async with owner:
        await owner.wait_connected()
        gid = await owner.create_group("bench", names)
        await owner.send_text(f"group:{gid}", "distributes the sender key")
        timings = []
        for i in range(rounds):
            start = time.perf_counter()
            await owner.send_text(f"group:{gid}", f"round {i}")
            timings.append(time.perf_counter() - start)
    timings.sort()
    print(
        f"group send to {members} members (Sender Keys distributed): median "
        f"{timings[len(timings) // 2] * 1000:.1f} ms, best {timings[0] * 1000:.1f} ms per "
        "message, wall time including the relay's durable commit (fsync) on loopback"
    )


async def bench_media(root: Path, url: str, megabytes: int) -> None:
    alice = await new_client(root, url, "media_alice")
    bob = await new_client(root, url, "media_bob")
    source = root / "big.bin"
    with source.open("wb") as f:  # megabytes of 10^6 bytes: 100 MB fits the relay's limit
        block = os.urandom(1_000_000)
        for _ in range(megabytes):
            f.write(block)
    size = source.stat().st_size
    events = bob.events()
    async with alice, bob:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        mid = await alice.send_file("media_bob", source)
        up = time.perf_counter() - start
        async for event in events:
            if isinstance(event, MessageReceived):
                break
        start = time.perf_counter()
        await bob.download_attachment(mid, root / "out.bin")
        down = time.perf_counter() - start
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = size / 1e6
    print(
        f"media {megabytes} MB: encrypt+upload {mb / up:.0f} MB/s ({up:.2f} s), "
        f"download+decrypt {mb / down:.0f} MB/s ({down:.2f} s), "
        f"peak RSS growth {(rss1 - rss0) / 1024:.0f} MiB"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--file-mb", type=int, default=100)
    parser.add_argument(
        "--passphrase", default=None, help="encrypt every account's store (SQLCipher)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bp-sdk-bench-"))
    relay_dir = root / "relay"
    relay_dir.mkdir()
    proc, url = start_relay(relay_dir)
    try:
        if args.file_mb:
            await bench_media(root, url, args.file_mb)
        if args.members:
            await bench_group(root, url, args.members)
        if args.messages:
            await bench_inbox(root, url, args.messages, args.passphrase)
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
