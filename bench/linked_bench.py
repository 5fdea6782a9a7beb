"""What linked devices cost a send: a real relay process on loopback; prints figures.

Run: ``python bench/linked_bench.py [--rounds 300] [--recipient-devices 3] [--own-devices 2]``

Not a test (pytest does not collect it). Issue 17's target: sending to a recipient
with 3 devices, plus a transcript to 2 other devices of our own, costs at most 3x
the single-device send. Two senders, each measured alone, one message at a time
(``send_text(..., wait=True)``: compose, encrypt per device, one relay send with
its durable commit, the "sent" state committed), the two senders taking turns so
that both see the same load:

* single: alice (one device) to bob (one device);
* linked: carol, with ``--own-devices`` other devices of her own, to dave, with
  ``--recipient-devices`` devices. Every message goes to dave's devices and, as a
  transcript in the same relay message, to carol's other devices.

The receiving devices stay offline (what is measured is the sender's cost, on two
shared cores), in both cases alike; their sessions therefore keep sending prekey
messages, as a first exchange does. The line ends in PASS or MISS against 3x.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sdk_bench import FAST_KDF, OPTIONS, load, new_client, start_relay

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2ee.client import Client, LinkGrant, NewDeviceKeys  # noqa: E402

TARGET_RATIO = 3.0


async def add_devices(first: Client, root: Path, count: int) -> None:
    """Link ``count`` more devices to ``first``'s account (each set up, then closed)."""
    for index in range(count):
        keys = NewDeviceKeys.generate()
        grant = LinkGrant.from_bytes((await first.devices.add(keys.auth_key)).to_bytes())
        device = await Client.link_device(
            root / f"{first.username}-{index + 2}",
            grant,
            keys,
            options=OPTIONS,
            kdf_limits=FAST_KDF,
        )
        await device.close()


def check_devices(sender: Client, to: str, devices: tuple[int, int]) -> None:
    """What was measured really went to every device (the sessions the sends used)."""
    engine = sender._ctx.engine
    found = (len(engine.session_devices(to)), len(engine.session_devices(sender.username)))
    assert found == devices, f"sent to {found} (recipient, own) devices, not {devices}"


async def alternating_sends(
    single: tuple[Client, str], linked: tuple[Client, str], rounds: int
) -> tuple[list[float], list[float]]:
    """Time one send of each in turn, so both see the same machine load."""
    timings: tuple[list[float], list[float]] = ([], [])
    for sender, to in (single, linked):
        await sender.wait_connected()
        for i in range(5):  # sessions, bundles, the first device-list answers
            await sender.send_text(to, f"warm-up {i}")
    for i in range(rounds):
        for (sender, to), out in zip((single, linked), timings, strict=True):
            start = time.perf_counter()
            await sender.send_text(to, f"round {i}")
            out.append(time.perf_counter() - start)
    return timings


def summary(timings: list[float]) -> str:
    ordered = sorted(timings)
    return (
        f"median {statistics.median(ordered) * 1000:.2f} ms, "
        f"p90 {ordered[int(len(ordered) * 0.9)] * 1000:.2f} ms, "
        f"mean {statistics.fmean(ordered) * 1000:.2f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--recipient-devices", type=int, default=3)
    parser.add_argument("--own-devices", type=int, default=2, help="other devices of the sender")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bp-linked-bench-"))
    relay_dir = root / "relay"
    relay_dir.mkdir()
    proc, url = start_relay(relay_dir)
    try:
        alice, bob = await new_client(root, url, "alice"), await new_client(root, url, "bob")
        await bob.close()
        carol, dave = await new_client(root, url, "carol"), await new_client(root, url, "dave")
        await add_devices(dave, root, args.recipient_devices - 1)
        await dave.close()
        # Linked before carol's first connect: she meets them then (her own bundles).
        await add_devices(carol, root, args.own_devices)
        async with alice, carol:
            single, linked = await alternating_sends((alice, "bob"), (carol, "dave"), args.rounds)
            check_devices(alice, "bob", (1, 0))
            check_devices(carol, "dave", (args.recipient_devices, args.own_devices))
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(root, ignore_errors=True)
    ratio = statistics.median(linked) / statistics.median(single)
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"single-device send (1 recipient device): {summary(single)}")
    print(
        f"linked send ({args.recipient_devices} recipient devices + {args.own_devices} own "
        f"devices): {summary(linked)}"
    )
    print(
        f"ratio of medians {ratio:.2f}x (target <= {TARGET_RATIO:.0f}x) {verdict}; "
        f"{args.rounds} sequential sends each; {load()}"
    )


if __name__ == "__main__":
    asyncio.run(main())
