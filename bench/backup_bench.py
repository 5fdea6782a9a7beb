"""Encrypted backup and restore of an account holding 100,000 messages.

Run:  python bench/backup_bench.py                 (100,000 messages; about half a minute)
      python bench/backup_bench.py --messages 20000 --rounds 3

The account is seeded as in bench/tui_bench.py (history rows written straight into the store,
the SDK's own row builder), then sealed with a passphrase. Measured, each round:

1. backup:  ``Client.backup`` on the open account: snapshot of the store (SQLite's online
            backup API), Argon2id (libsodium's moderate preset, as shipped), the tar stream
            encrypted with the secret stream, fsync, rename. Target <= 10 s.
2. restore: ``Client.restore`` into a new directory: Argon2id, decrypt and authenticate every
            record, extract, reopen the store (Argon2id again: the store's own passphrase),
            drop the ratchet state, a new device's keys, rename, open the account.
            Target <= 20 s. Telling the relay (``register``) is a network round trip and not
            part of the figure.

Prints one line per measurement and PASS or MISS against each target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tui_bench import _load, seed

from e2ee.client import DB_FILE, Client
from e2ee.store.sqlite import SQLiteProtocolStore

PASSPHRASE = "a long passphrase for the bench"
BACKUP_TARGET_S = 10.0
RESTORE_TARGET_S = 20.0


async def run(messages: int, rounds: int) -> bool:
    ok = True
    with tempfile.TemporaryDirectory(prefix="bp-backup-bench-") as tmp:
        root = Path(tmp)
        folder = root / "account"
        began = time.perf_counter()
        await seed(folder, messages)
        with SQLiteProtocolStore.open(folder / DB_FILE, None) as store:
            store.change_passphrase(None, PASSPHRASE)
        db_size = (folder / DB_FILE).stat().st_size
        print(
            f"seeded {messages} messages in {time.perf_counter() - began:.1f} s, "
            f"database {db_size / 1e6:.1f} MB"
        )
        out = root / "account.bpbak"
        for n in range(1, rounds + 1):
            client = await Client.open(folder, PASSPHRASE)
            try:
                expected = await asyncio.to_thread(client.history.max_seq, "messages")
                t0 = time.perf_counter()
                info = await client.recovery.backup(out, PASSPHRASE)
                backup_s = time.perf_counter() - t0
            finally:
                await client.close()
            target = root / f"restored-{n}"
            t0 = time.perf_counter()
            restored = await Client.restore(out, target, PASSPHRASE)
            restore_s = time.perf_counter() - t0
            count = await asyncio.to_thread(restored.history.max_seq, "messages")
            await restored.close()
            shutil.rmtree(target)
            assert count == expected >= messages, (count, expected, messages)
            b_ok, r_ok = backup_s <= BACKUP_TARGET_S, restore_s <= RESTORE_TARGET_S
            ok = ok and b_ok and r_ok
            print(
                f"round {n}: backup {backup_s:.2f} s ({info.size / 1e6:.1f} MB file) "
                f"{'PASS' if b_ok else 'MISS'} (<= {BACKUP_TARGET_S:.0f} s); "
                f"restore {restore_s:.2f} s {'PASS' if r_ok else 'MISS'} "
                f"(<= {RESTORE_TARGET_S:.0f} s); {_load()}",
                flush=True,
            )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {_load()}")
    ok = asyncio.run(run(args.messages, args.rounds))
    print("PASS" if ok else "MISS", flush=True)


if __name__ == "__main__":
    main()
