"""Clients for a new device of an existing account: ``Client.restore`` and ``Client.link_device``.

Invariants:

* Both build the new data directory first (from a backup, or from a link grant with an
  optional history hand-over) and only then open a client on it; a failure leaves the
  directory as :func:`~e2ee.client.backup.restore_dir` or
  :func:`~e2ee.client.devices.create_linked_dir` leave it.
* They are bound to :class:`~e2ee.client.Client` as class methods, so the public API is
  ``Client.restore(...)`` and ``Client.link_device(...)``; they live here to keep the
  facade small.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from e2ee.client.backup import restore_dir
from e2ee.client.context import ClientOptions
from e2ee.client.devices import LinkGrant, NewDeviceKeys, create_linked_dir, link_with_history
from e2ee.client.link import LinkFactory, default_link_factory
from e2ee.media import Progress
from e2ee.store.sealing import KdfLimits

if TYPE_CHECKING:
    from e2ee.client.facade import Client

__all__ = ["link_client", "restore_client"]


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


async def restore_client(
    cls: type[Client],
    backup_file: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    passphrase: str,
    *,
    link_factory: LinkFactory | None = None,
    now_ms: Callable[[], int] = _system_ms,
    options: ClientOptions | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
    jitter: Callable[[], float] = random.random,
) -> Client:
    """Restore a backup (``client.recovery.backup``) into a new data directory.

    The account keeps its name, identity key, contacts, trust, groups and history;
    it becomes a new device of that identity (the backed-up sessions are dropped, see
    docs/protocol.md). Call :meth:`Client.register` next: it makes this device the account's
    only device at the relay and uploads fresh prekeys; contacts' next messages set up
    new sessions. Files from a backup made with media are in ``data_dir/media``.

    Args:
        backup_file: the backup.
        data_dir: a directory that does not exist yet (or is empty).
        passphrase: the backup's passphrase (it also protects the restored store).
        link_factory, now_ms, options, random_bytes, jitter: as :meth:`Client.open`.

    Returns:
        The client, not registered and not connected.

    Raises:
        WrongPassphrase: the passphrase does not open the backup.
        BackupCorrupt: truncated, tampered, or not a backup.
        UsageError: ``data_dir`` is not empty, or the passphrase is empty.
        StorageError: a file cannot be read or written.
        In every case ``data_dir`` is left as it was.
    """
    folder = Path(data_dir)
    await asyncio.to_thread(restore_dir, Path(backup_file), folder, passphrase, now_ms=now_ms)
    return await cls.open(
        folder,
        passphrase,
        link_factory=link_factory,
        now_ms=now_ms,
        options=options,
        random_bytes=random_bytes,
        jitter=jitter,
    )


async def link_client(
    cls: type[Client],
    data_dir: str | os.PathLike[str],
    grant: LinkGrant,
    keys: NewDeviceKeys,
    *,
    passphrase: str | None = None,
    link_factory: LinkFactory | None = None,
    now_ms: Callable[[], int] = _system_ms,
    options: ClientOptions | None = None,
    kdf_limits: KdfLimits | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
    jitter: Callable[[], float] = random.random,
    progress: Progress | None = None,
) -> Client:
    """Set this machine up as a new device of an existing account, from its grant.

    The grant comes from an existing device (:meth:`Devices.add`, or through the
    provisioning channel); ``keys`` are the ones whose :attr:`NewDeviceKeys.auth_key`
    that device registered. The new data directory holds the account's identity key
    (safety numbers do not change) with this device's own registration id, signed
    prekey, one-time prekeys and relay auth key; the prekeys are uploaded here.

    Args:
        data_dir: a directory without an account (created if missing).
        grant: the grant.
        keys: this device's keys, drawn before the grant was asked for.
        passphrase, link_factory, now_ms, options, kdf_limits, random_bytes, jitter:
            as :meth:`Client.create`.
        progress: called with (bytes downloaded, total) while a history hand-over
            (``grant.history_blob``) comes in, on the event loop's thread.

    Returns:
        The client, registered, not connected.

    Raises:
        InvalidLinkGrant: the grant names another auth key or does not load; nothing
            was written.
        UsageError: ``data_dir`` already holds an account.
        AuthFailed: the relay does not know this device (it was removed since).
        TransportError: the relay cannot be reached; the directory stays, and
            :meth:`Client.register` finishes the upload later.
        StorageError: the database cannot be created.
    """
    folder = Path(data_dir)
    factory = link_factory or default_link_factory
    if grant.history_blob:
        opened = await link_with_history(
            folder, grant, keys, factory, passphrase, now_ms, kdf_limits, progress
        )
    else:
        opened = await asyncio.to_thread(
            create_linked_dir,
            folder,
            grant,
            keys,
            passphrase=passphrase,
            now_ms=now_ms,
            kdf_limits=kdf_limits,
        )
    client = await cls._build(opened, link_factory, now_ms, options, random_bytes, jitter)
    try:
        await client.register()
    except BaseException:
        await client.close()
        raise
    return client
