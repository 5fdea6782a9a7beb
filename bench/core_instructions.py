"""Instructions per same-chain 1:1 message, counted by valgrind (callgrind).

Wall-clock figures move with whatever else the machine runs; instruction counts do
not (callgrind counts the same total for the same program and input whatever the
load). This prints instructions per message (encrypt + decrypt, 100-byte plaintext,
in-memory store) for:

* ``e2ee``: ``ProtocolEngine.encrypt`` + ``decrypt`` (strict parsing, staged copy,
  one validated commit, per-peer locks: everything the core does), and
* ``python-axolotl``: python-axolotl's own ``SessionCipher`` on its own in-memory
  stores, in the same interpreter with e2ee's protobuf shim and fast paths
  installed: the floor our layers sit on.

Each figure is ``(count(4n) - count(n)) / 3n``, so start-up and session set-up
cancel out. Needs ``valgrind`` on the PATH; takes about a minute.

    python bench/core_instructions.py [--messages N]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

_WORKLOAD = """
import sys
sys.path.insert(0, {here!r})
import core_bench as cb
from e2ee.store import MemoryProtocolStore

if {raw!r}:
    import _axolotl_reference as ref
    from axolotl.protocol.whispermessage import WhisperMessage

    sender, receiver = ref.setup()

    def one() -> None:
        receiver.decryptMsg(WhisperMessage(serialized=sender.encrypt(cb.PLAINTEXT).serialize()))
else:
    alice, bob = cb.pair(lambda _: MemoryProtocolStore())

    def one() -> None:
        bob.decrypt(cb.ALICE, alice.encrypt(cb.BOB, cb.PLAINTEXT))

for _ in range(50 + int(sys.argv[1])):
    one()
"""


def instructions(script: Path, messages: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/callgrind.out",
                sys.executable,
                str(script),
                str(messages),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"refs:\s*([\d,]+)", out.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_message(raw: bool, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "workload.py"
        script.write_text(_WORKLOAD.format(here=str(HERE), raw=raw))
        low, high = instructions(script, n), instructions(script, 4 * n)
    return (high - low) / (3 * n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100, help="n (runs n and 4n)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    ours = per_message(False, args.messages)
    floor = per_message(True, args.messages)
    print("same-chain 1:1 encrypt+decrypt, instructions per message (callgrind)")
    print(f"  e2ee.core.ProtocolEngine      {ours / 1e3:8.1f} k")
    print(f"  python-axolotl SessionCipher  {floor / 1e3:8.1f} k")
    print(f"  e2ee's layers                 {(ours - floor) / 1e3:8.1f} k")


if __name__ == "__main__":
    main()
