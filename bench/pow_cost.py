"""What the relay's registration proof of work costs a client; prints figures.

Run: ``python bench/pow_cost.py [--difficulty 20] [--runs 20]``

Not a test (pytest does not collect it). Measures the hash rate of the solver the SDK uses
(``blindpost_wire.registration.solve_pow``, one core, CPython) and the wall time of ``--runs``
solves of fresh random challenges at ``--difficulty``; the expected cost of one solve is
``2**difficulty / hash_rate`` seconds, and single solves scatter widely around it (the number
of tries is geometric). Run it on an idle machine for figures to quote in
docs/self-hosting.md.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time

from blindpost_wire.registration import solve_pow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--difficulty", type=int, default=20)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    # Hash rate: solve at an impossible difficulty for a fixed number of tries is not
    # possible with solve_pow, so count the tries of real solves instead.
    times: list[float] = []
    tries = 0
    for _ in range(args.runs):
        challenge = secrets.token_urlsafe(48)
        began = time.perf_counter()
        nonce = solve_pow(challenge, "someone", args.difficulty)
        times.append(time.perf_counter() - began)
        tries += nonce + 1
    rate = tries / sum(times)
    print(f"difficulty {args.difficulty} bits, {args.runs} solves")
    print(f"hash rate: {rate / 1e6:.2f} M hashes/s (one core)")
    print(f"expected cost per solve: {2**args.difficulty / rate:.2f} s")
    print(
        f"measured: mean {statistics.mean(times):.2f} s, median {statistics.median(times):.2f} s,"
        f" max {max(times):.2f} s"
    )


if __name__ == "__main__":
    main()
