"""Local media encryption throughput and memory; prints figures (not a test).

Run: ``python bench/media_bench.py [--mb 256] [--runs 3]``

Encrypts a file of random bytes with :func:`e2ee.media.encrypt_file` and
decrypts it with :func:`e2ee.media.decrypt_file` (no relay, no network), and
prints MB/s for each direction (best of ``--runs``) and the peak Python
allocation during both (tracemalloc): it must stay a few chunks, whatever the
file size. The SDK's target is >= 50 MB/s each way on a quiet machine; run it
on one (a loaded machine measures the load, not the code).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2ee.media import CHUNK_SIZE, decrypt_file, encrypt_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="runs; the best is printed")
    args = parser.parse_args()
    size = args.mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "in.bin"
        with source.open("wb") as f:
            block = os.urandom(1024 * 1024)
            for _ in range(args.mb):
                f.write(block)
        best_enc = best_dec = float("inf")
        peak = 0
        for _ in range(args.runs):
            tracemalloc.start()
            start = time.perf_counter()
            enc = encrypt_file(source, directory=folder)
            middle = time.perf_counter()
            decrypt_file(enc.path, folder / "out.bin", enc.key, enc.digest)
            end = time.perf_counter()
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            best_enc = min(best_enc, middle - start)
            best_dec = min(best_dec, end - middle)
            enc.path.unlink()
            (folder / "out.bin").unlink()
    print(f"file: {args.mb} MiB, best of {args.runs} runs")
    print(f"encrypt: {size / best_enc / 1e6:8.1f} MB/s")
    print(f"decrypt: {size / best_dec / 1e6:8.1f} MB/s")
    print(f"peak Python allocation: {peak / 1024:.0f} KiB ({peak / CHUNK_SIZE:.1f} chunks)")


if __name__ == "__main__":
    main()
