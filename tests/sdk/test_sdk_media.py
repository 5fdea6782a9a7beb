"""Chunked media encryption: round trips, tampering, truncation, no partial output."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2ee.errors import InvalidMessage, UsageError
from e2ee.media import (
    CHUNK_SIZE,
    HEADER_BYTES,
    MediaCorrupt,
    ciphertext_size,
    decrypt_file,
    encrypt_file,
)


def _write(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 7]
)
def test_round_trip_at_chunk_boundaries(tmp_path: Path, size: int) -> None:
    source = _write(tmp_path / "in.bin", size)
    enc = encrypt_file(source, directory=tmp_path)
    assert enc.size == ciphertext_size(size) == enc.path.stat().st_size
    assert enc.digest == hashlib.sha256(enc.path.read_bytes()).digest()
    assert enc.plaintext_size == size
    out = tmp_path / "out.bin"
    assert decrypt_file(enc.path, out, enc.key, enc.digest) == size
    assert out.read_bytes() == source.read_bytes()


def test_each_file_gets_a_fresh_key_and_ciphertext(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.bin", 1000)
    a, b = encrypt_file(source, directory=tmp_path), encrypt_file(source, directory=tmp_path)
    assert a.key != b.key and a.digest != b.digest


def test_progress_reports_reach_the_total(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.bin", 2 * CHUNK_SIZE + 5)
    seen: list[tuple[int, int]] = []
    enc = encrypt_file(source, directory=tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2 * CHUNK_SIZE + 5, 2 * CHUNK_SIZE + 5)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    back: list[tuple[int, int]] = []
    decrypt_file(
        enc.path, tmp_path / "o", enc.key, enc.digest, progress=lambda d, t: back.append((d, t))
    )
    assert back[-1] == (enc.size, enc.size)


def _corrupt_case(tmp_path: Path, mutate: str) -> tuple[Path, bytes, bytes]:
    source = _write(tmp_path / "in.bin", 2 * CHUNK_SIZE + 100)
    enc = encrypt_file(source, directory=tmp_path)
    data = bytearray(enc.path.read_bytes())
    if mutate == "flip":
        data[HEADER_BYTES + CHUNK_SIZE + 40] ^= 1
    elif mutate == "truncate_boundary":
        data = data[: HEADER_BYTES + 2 * (CHUNK_SIZE + 17)]
    elif mutate == "truncate_mid":
        data = data[:-10]
    elif mutate == "append":
        data += b"extra"
    elif mutate == "header":
        data[3] ^= 0xFF
    enc.path.write_bytes(bytes(data))
    # The digest is recomputed for the tampered file, so only the stream's own
    # authentication can catch it (an attacker who controls the pointer's digest).
    return enc.path, enc.key, hashlib.sha256(bytes(data)).digest()


@pytest.mark.parametrize(
    "mutate", ["flip", "truncate_boundary", "truncate_mid", "append", "header"]
)
def test_tampered_or_truncated_file_is_rejected_without_output(tmp_path: Path, mutate: str) -> None:
    path, key, digest = _corrupt_case(tmp_path, mutate)
    out = tmp_path / "out" / "photo.jpg"
    out.parent.mkdir()
    with pytest.raises(MediaCorrupt) as info:
        decrypt_file(path, out, key, digest)
    assert isinstance(info.value, InvalidMessage)
    assert list(out.parent.iterdir()) == []  # no partial plaintext anywhere
    assert key.hex() not in str(info.value)


def test_digest_mismatch_is_rejected_and_existing_destination_kept(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.bin", 5000)
    enc = encrypt_file(source, directory=tmp_path)
    out = tmp_path / "existing.txt"
    out.write_text("keep me")
    with pytest.raises(MediaCorrupt):
        decrypt_file(enc.path, out, enc.key, bytes(32))
    assert out.read_text() == "keep me"


def test_wrong_key_is_rejected(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.bin", 5000)
    enc = encrypt_file(source, directory=tmp_path)
    with pytest.raises(MediaCorrupt):
        decrypt_file(enc.path, tmp_path / "o", bytes(32), enc.digest)


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        encrypt_file(tmp_path / "missing")
    with pytest.raises(UsageError):
        decrypt_file(tmp_path / "missing", tmp_path / "o", bytes(32), bytes(32))
    with pytest.raises(UsageError):
        decrypt_file(tmp_path / "missing", tmp_path / "o", b"short", bytes(32))


def test_key_not_in_repr(tmp_path: Path) -> None:
    enc = encrypt_file(_write(tmp_path / "in.bin", 10), directory=tmp_path)
    assert enc.key.hex() not in repr(enc) and repr(enc.key) not in repr(enc)


@given(st.binary(max_size=3 * 1024), st.integers(min_value=0, max_value=10**6))
@settings(max_examples=50, deadline=None)
def test_any_single_byte_change_is_detected(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, at: int
) -> None:
    base = tmp_path_factory.mktemp("flip")
    source = base / "in.bin"
    source.write_bytes(data)
    enc = encrypt_file(source, directory=base)
    blob = bytearray(enc.path.read_bytes())
    blob[at % len(blob)] ^= 0x01
    enc.path.write_bytes(bytes(blob))
    with pytest.raises(MediaCorrupt):
        decrypt_file(enc.path, base / "out", enc.key, hashlib.sha256(bytes(blob)).digest())
    enc.path.unlink()


@pytest.mark.slow
def test_large_file_keeps_memory_flat(tmp_path: Path) -> None:
    """A 64 MiB file goes through a few chunk buffers, never the whole file.

    The throughput figure lives in bench/media_bench.py (timings are not
    asserted in tests: a busy machine would make them false).
    """
    size = 64 * 1024 * 1024
    source = tmp_path / "big.bin"
    with source.open("wb") as f:
        block = os.urandom(1024 * 1024)
        for _ in range(size // len(block)):
            f.write(block)
    tracemalloc.start()
    enc = encrypt_file(source, directory=tmp_path)
    decrypt_file(enc.path, tmp_path / "out.bin", enc.key, enc.digest)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * CHUNK_SIZE  # a few chunk buffers, not the file
    assert (tmp_path / "out.bin").stat().st_size == size
