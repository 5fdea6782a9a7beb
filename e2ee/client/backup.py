"""Encrypted backups of a data directory, and restoring one into a new directory.

Invariants:

* The store is read through one method, ``SQLiteProtocolStore.snapshot_to`` (SQLite's
  online backup API on the store's own connection); the snapshot lives in the data
  directory (as protected as the database itself) only while the backup is written.
* A backup is a versioned header, then a tar stream (``manifest.json``, ``blindpost.db``,
  ``media/*``) encrypted with libsodium's secret stream (XChaCha20-Poly1305, via PyNaCl)
  in records of at most :data:`CHUNK` plaintext bytes, under a key Argon2id derives from
  the passphrase. The first record is empty, with the header as its associated data: it
  checks the passphrase (and the header) before any content is read. The last record
  carries ``TAG_FINAL``. Neither side ever holds the whole backup in memory.
* A backup file appears only complete (written under a temporary name, fsync'd, renamed).
* Restoring writes into a new sibling directory and renames it into place only after every
  record authenticated, the final tag was read with nothing after it, and the restored
  store was reset (:func:`restore_dir`): a wrong passphrase, a truncated or tampered file
  leaves nothing behind.
* A restored store keeps the identity key, trust, contacts, groups and history, but none of
  the backed-up device's ratchet state (sessions, sender keys, prekeys): it becomes a new
  device of the same identity (docs/protocol.md, "Backup and restore").
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import struct
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import nacl.bindings as sodium
import nacl.exceptions
import nacl.pwhash
import nacl.utils

from blindpost_wire.names import MAX_DEVICE_ID
from e2ee.client.datadir import (
    DB_FILE,
    META_ACCOUNT_CREATED,
    META_REGISTERED,
)
from e2ee.core import ProtocolEngine
from e2ee.errors import BackupCorrupt, StorageError, UsageError, WrongPassphrase
from e2ee.history import History
from e2ee.messaging import keys
from e2ee.store import Changes
from e2ee.store.sealing import KDF_MODERATE, KdfLimits
from e2ee.store.sqlite import SQLiteProtocolStore
from e2ee.store.sqlite_cipher import KEYRING_SUFFIX

__all__ = [
    "BACKUP_VERSION",
    "CHUNK",
    "META_RESTORED_FROM",
    "BackupInfo",
    "MediaFile",
    "restore_dir",
    "write_backup",
]

MAGIC: Final = b"BPBACKUP"
#: The format this build writes (and the only one it reads).
BACKUP_VERSION: Final = 1
#: Plaintext bytes per encrypted record.
CHUNK: Final = 1 << 20
#: Set in a restored store until the relay made it the account's device: the backed-up
#: device's id, whose credentials sign ``POST /v1/devices/reset``.
META_RESTORED_FROM: Final = "sdk.restored_from_device"
MEDIA_DIR: Final = "media"
_MANIFEST: Final = "manifest.json"
_HEADER: Final = struct.Struct(">8sBQQ16s24s")
_LEN: Final = struct.Struct(">I")
_ABYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_TAG_MESSAGE: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
# A header asking for more than this is refused before any work (a hostile file must not
# make restore allocate gigabytes or spin for minutes).
_MAX_OPSLIMIT: Final = nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
_MAX_MEMLIMIT: Final = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
_COPY: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class MediaFile:
    """A file to put into a backup's ``media/`` folder under ``name`` (no slashes)."""

    name: str
    path: Path


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """What a written backup holds."""

    path: Path
    username: str
    size: int
    media_files: int
    created_ms: int


def _derive(passphrase: str, salt: bytes, limits: KdfLimits) -> bytes:
    key: bytes = nacl.pwhash.argon2id.kdf(
        sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES,
        passphrase.encode("utf-8"),
        salt,
        opslimit=limits.opslimit,
        memlimit=limits.memlimit,
    )
    return key


class _EncryptingWriter(io.RawIOBase):
    """A write-only file object that encrypts what it is given, one record per CHUNK."""

    def __init__(self, out: IO[bytes], passphrase: str, limits: KdfLimits) -> None:
        super().__init__()
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        key = _derive(passphrase, salt, limits)
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        ss_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._state, key)
        header = _HEADER.pack(
            MAGIC, BACKUP_VERSION, limits.opslimit, limits.memlimit, salt, ss_header
        )
        out.write(header)
        self._ad: bytes | None = header
        self._out = out
        self._buf = bytearray()
        self._push(b"", _TAG_MESSAGE)  # the key check: a wrong passphrase fails here

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._buf += view
        while len(self._buf) >= CHUNK:
            self._push(bytes(self._buf[:CHUNK]), _TAG_MESSAGE)
            del self._buf[:CHUNK]
        return len(view)

    def _push(self, plain: bytes, tag: int) -> None:
        sealed = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, plain, self._ad, tag
        )
        self._ad = None
        self._out.write(_LEN.pack(len(sealed)))
        self._out.write(sealed)

    def finish(self) -> None:
        """Encrypt what is buffered as the final record."""
        self._push(bytes(self._buf), _TAG_FINAL)
        self._buf.clear()


class _DecryptingReader(io.RawIOBase):
    """A read-only file object over a backup: authenticated plaintext, record by record."""

    def __init__(self, src: IO[bytes], passphrase: str) -> None:
        super().__init__()
        header = src.read(_HEADER.size)
        if len(header) != _HEADER.size:
            raise BackupCorrupt("not a Blindpost backup (too short)")
        magic, version, opslimit, memlimit, salt, ss_header = _HEADER.unpack(header)
        if magic != MAGIC:
            raise BackupCorrupt("not a Blindpost backup")
        if version != BACKUP_VERSION:
            raise BackupCorrupt(f"backup format {version} is not supported (this build reads 1)")
        if not (1 <= opslimit <= _MAX_OPSLIMIT and 8192 <= memlimit <= _MAX_MEMLIMIT):
            raise BackupCorrupt("the backup's key-derivation settings are out of range")
        key = _derive(passphrase, salt, KdfLimits(opslimit, memlimit))
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, ss_header, key)
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise BackupCorrupt("the backup's header is damaged") from exc
        self._src = src
        self._ad: bytes | None = header
        self._plain = b""
        self._pos = 0
        self._final = False
        self._first = True
        self._next_record()  # the empty key-check record
        if self._final:
            raise BackupCorrupt("the backup is empty")

    def readable(self) -> bool:
        return True

    def _next_record(self) -> None:
        raw_len = self._src.read(_LEN.size)
        if len(raw_len) != _LEN.size:
            raise BackupCorrupt("the backup is truncated (its end is missing)")
        (size,) = _LEN.unpack(raw_len)
        if not _ABYTES <= size <= CHUNK + _ABYTES:
            raise BackupCorrupt("the backup is damaged (bad record length)")
        sealed = self._src.read(size)
        if len(sealed) != size:
            raise BackupCorrupt("the backup is truncated (its end is missing)")
        try:
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, sealed, self._ad
            )
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            if self._first:
                raise WrongPassphrase(
                    "the passphrase does not open this backup (or its start is damaged)"
                ) from exc
            raise BackupCorrupt("the backup was tampered with or is damaged") from exc
        self._first = False
        self._ad = None
        if tag == _TAG_FINAL:
            self._final = True
        elif tag != _TAG_MESSAGE:
            raise BackupCorrupt("the backup is damaged (unexpected record tag)")
        self._plain, self._pos = plain, 0

    def read(self, size: int = -1) -> bytes:
        while self._pos >= len(self._plain):
            if self._final:
                return b""
            self._next_record()
        end = len(self._plain) if size < 0 else self._pos + size
        out = self._plain[self._pos : end]
        self._pos += len(out)
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def check_complete(self) -> None:
        """Read to the final record and require that nothing follows it.

        Raises:
            BackupCorrupt: truncated, damaged, or bytes after the final record.
        """
        while self.read(_COPY):
            pass
        if self._src.read(1):
            raise BackupCorrupt("the backup has bytes after its end")


def _tar_info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(mtime)
    return info


@contextlib.contextmanager
def _removed_after(path: Path) -> Iterator[Path]:
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_backup(
    store: SQLiteProtocolStore,
    folder: Path,
    out: Path,
    passphrase: str,
    manifest: dict[str, Any],
    *,
    media: Sequence[MediaFile] = (),
    kdf_limits: KdfLimits = KDF_MODERATE,
    now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
) -> BackupInfo:
    """Write an encrypted backup of ``store`` (and ``media``) to ``out`` (blocking).

    Args:
        store: the open store of the account.
        folder: its data directory (where the snapshot is taken).
        out: the backup file to write (replaced if it exists, only once complete).
        passphrase: what the backup is encrypted under.
        manifest: account facts to record (username, relay URL, device id).
        media: files for the backup's ``media/`` folder.
        kdf_limits: Argon2id cost (stored in the header).
        now_ms: the clock.

    Returns:
        What was written.

    Raises:
        UsageError: empty passphrase, or a bad media name.
        StorageError: the store or a file cannot be read, or ``out`` cannot be written
            (then no file is left at ``out``'s temporary name, and ``out`` is unchanged).
    """
    if not passphrase:
        raise UsageError("a backup needs a passphrase")
    for item in media:
        if "/" in item.name or item.name.startswith(".") or not item.name:
            raise UsageError(f"bad media name {item.name!r}")
    created = now_ms()
    doc = {**manifest, "version": BACKUP_VERSION, "created_ms": created, "media": len(media)}
    body = json.dumps(doc, sort_keys=True).encode("utf-8")
    tag = secrets.token_hex(4)
    snapshot = folder / f".backup-snapshot-{tag}"
    keyring = folder / f".backup-snapshot-{tag}{KEYRING_SUFFIX}"
    partial = out.parent / f".{out.name}.partial-{tag}"
    try:
        with _removed_after(snapshot), _removed_after(keyring), _removed_after(partial):
            store.snapshot_to(snapshot)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb", buffering=_COPY) as raw:
                writer = _EncryptingWriter(raw, passphrase, kdf_limits)
                with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    tar.addfile(_tar_info(_MANIFEST, len(body), created / 1000), io.BytesIO(body))
                    _add_file(tar, snapshot, DB_FILE)
                    if keyring.exists():  # the store is encrypted at rest (SQLCipher)
                        _add_file(tar, keyring, DB_FILE + KEYRING_SUFFIX)
                    for item in media:
                        _add_file(tar, item.path, f"{MEDIA_DIR}/{item.name}")
                writer.finish()
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, out)
        _fsync_dir(out.parent)
    except OSError as exc:
        raise StorageError(f"cannot write the backup: {exc.strerror or exc}") from exc
    return BackupInfo(
        out, str(manifest.get("username", "")), out.stat().st_size, len(media), created
    )


def _add_file(tar: tarfile.TarFile, path: Path, name: str) -> None:
    with path.open("rb") as fh:
        st = os.fstat(fh.fileno())
        tar.addfile(_tar_info(name, st.st_size, st.st_mtime), fh)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _member_target(root: Path, member: tarfile.TarInfo, seen: set[str]) -> Path:
    name = member.name
    if not member.isfile() or name in seen:
        raise BackupCorrupt("the backup holds an unexpected entry")
    if name in (_MANIFEST, DB_FILE, DB_FILE + KEYRING_SUFFIX):
        target = root / name
    else:
        prefix, _, leaf = name.partition("/")
        if prefix != MEDIA_DIR or not leaf or "/" in leaf or leaf.startswith("."):
            raise BackupCorrupt("the backup holds an unexpected entry")
        target = root / MEDIA_DIR / leaf
        target.parent.mkdir(mode=0o700, exist_ok=True)
    seen.add(name)
    return target


def _extract(src: IO[bytes], passphrase: str, root: Path) -> dict[str, Any]:
    reader = _DecryptingReader(src, passphrase)
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                target = _member_target(root, member, seen)
                data = tar.extractfile(member)
                if data is None:
                    raise BackupCorrupt("the backup holds an unexpected entry")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    shutil.copyfileobj(data, fh, _COPY)
                    fh.flush()
                    os.fsync(fh.fileno())
    except tarfile.TarError as exc:
        raise BackupCorrupt("the backup's content is damaged") from exc
    reader.check_complete()
    if _MANIFEST not in seen or DB_FILE not in seen:
        raise BackupCorrupt("the backup lacks its manifest or database")
    try:
        manifest = json.loads((root / _MANIFEST).read_bytes())
    except ValueError as exc:
        raise BackupCorrupt("the backup's manifest is damaged") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != BACKUP_VERSION:
        raise BackupCorrupt("the backup's manifest is damaged")
    return manifest


def restore_dir(
    backup: Path,
    folder: Path,
    passphrase: str,
    *,
    now_ms: Callable[[], int],
    linked_device: int | None = None,
) -> dict[str, Any]:
    """Restore ``backup`` into the new directory ``folder`` (blocking; run in a thread).

    With ``linked_device`` (a history hand-over to a linked device, ``e2ee.client.devices``)
    the restored account becomes that device id and is not marked as replacing the
    account's devices: the relay added it already.

    The restored account keeps its identity key, trust, contacts, groups and history; its
    ratchet state is dropped and it becomes a new device of the same identity (a new
    device id, registration id and prekeys), recorded under :data:`META_RESTORED_FROM`
    until the relay is told (``Client.register``).

    Args:
        backup: the backup file.
        folder: a directory that does not exist yet (or is empty).
        passphrase: the backup's passphrase; it also opens the restored store, and seals it
            if it had no passphrase.
        now_ms: the clock.

    Returns:
        The backup's manifest.

    Raises:
        UsageError: ``folder`` holds something already, or the passphrase is empty.
        WrongPassphrase: the passphrase does not open the backup.
        BackupCorrupt: truncated, tampered, or not a backup.
        StorageError: a file cannot be read or written.
        In every case nothing is left at ``folder`` (an empty one stays as it was).
    """
    if not passphrase:
        raise UsageError("a backup needs a passphrase")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{folder} is not empty: restore into a new directory")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.parent / f".{folder.name}.restore-{secrets.token_hex(4)}"
    try:
        work.mkdir(mode=0o700)
        try:
            with backup.open("rb") as src:
                manifest = _extract(src, passphrase, work)
        except OSError as exc:
            raise StorageError(f"cannot read the backup: {exc.strerror or exc}") from exc
        (work / _MANIFEST).unlink()
        _reset_restored(work / DB_FILE, passphrase, manifest, now_ms, linked_device)
        _fsync_dir(work)
        if folder.exists():
            folder.rmdir()  # empty (checked above); rename needs the name free
        os.rename(work, folder)
        _fsync_dir(folder.parent)
    except OSError as exc:
        raise StorageError(f"cannot restore into {folder}: {exc.strerror or exc}") from exc
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return manifest


def _reset_restored(
    db: Path,
    passphrase: str,
    manifest: dict[str, Any],
    now_ms: Callable[[], int],
    linked_device: int | None = None,
) -> None:
    try:
        store = SQLiteProtocolStore.open(db, passphrase)
        protected = True
    except WrongPassphrase:
        # Backed up from an account without a passphrase: seal it now.
        store = SQLiteProtocolStore.open(db, None)
        protected = False
    with store:
        if not protected:
            store.change_passphrase(None, passphrase)
        account = store.load_account()
        if account is None or account.name != manifest.get("username"):
            raise BackupCorrupt("the backup's database does not hold its account")
        store.drop_ratchet_state()
        engine = ProtocolEngine(store, now_ms=now_ms)
        if linked_device is None:
            engine.reset_device(account.device_id % MAX_DEVICE_ID + 1)
        else:
            engine.reset_device(linked_device)
        # Our Sender Keys were dropped: forget which member devices hold them, so the first
        # group message of the new device sends its new key to every member again.
        history = History.open(store)
        try:
            handed_out = history.counter_ids(keys.DISTRIBUTED_PREFIX)
        finally:
            history.close()
        store.commit(
            Changes(
                app_rows_delete=frozenset(("counters", name) for name in handed_out),
                meta_put={
                    META_REGISTERED: "0",
                    META_ACCOUNT_CREATED: "1",
                    META_RESTORED_FROM: "" if linked_device else str(account.device_id),
                },
            )
        )
