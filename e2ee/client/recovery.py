"""Backups and the recovery key of an open account: ``Client.recovery``.

Invariants:

* Everything here acts on the account the client has open, through the same
  context (store, relay link, clock) as the rest of the client; restoring a
  backup into a new directory is :meth:`e2ee.client.Client.restore`, which
  builds a client.
* A backup reads the store through ``SQLiteProtocolStore.snapshot_to`` only
  (:mod:`e2ee.client.backup`); attachments go in as downloaded now (an expired
  one is left out, never a partial one).
* A recovery key is shown once and never stored: the relay keeps its verifier.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from e2ee.client.account import recover_account, set_recovery_key
from e2ee.client.attachments import download_attachment
from e2ee.client.backup import BackupInfo, MediaFile, write_backup
from e2ee.client.context import ClientContext
from e2ee.client.datadir import META_RECOVERY_SET, read_relay_urls
from e2ee.client.link import LinkFactory
from e2ee.client_errors import NotRegistered
from e2ee.core.recovery import RecoveryKey
from e2ee.errors import E2EEError, TransportError
from e2ee.store.sealing import KDF_MODERATE, KdfLimits

__all__ = ["Recovery"]


class Recovery:
    """Backups and the recovery key of one open account (``client.recovery``).

    Use the client's :attr:`~e2ee.client.Client.recovery`; the client checks it is
    open before each call.
    """

    def __init__(self, ctx: ClientContext, link_factory: LinkFactory, auth_key: bytes) -> None:
        self._ctx = ctx
        self._link_factory = link_factory
        self._auth_key = auth_key

    def __repr__(self) -> str:
        return f"Recovery(user={self._ctx.me.name!r})"

    async def backup(
        self,
        out: str | os.PathLike[str],
        passphrase: str,
        *,
        with_media: bool = False,
        kdf_limits: KdfLimits | None = None,
    ) -> BackupInfo:
        """Write an encrypted backup of this account to ``out``.

        It holds the identity keys, sessions, groups, contacts, trust and history (and,
        with ``with_media``, every attachment still on the relay, downloaded now; ones
        that expired are left out). Streamed: never whole in memory. ``out`` is replaced
        only once the new backup is complete.

        Args:
            out: the backup file.
            passphrase: what the backup is encrypted under (Argon2id, then libsodium's
                secret stream).
            with_media: include attachments.
            kdf_limits: Argon2id cost (default: libsodium's moderate preset).

        Returns:
            What was written.

        Raises:
            UsageError: empty passphrase.
            StorageError: the store cannot be read or ``out`` cannot be written.
        """
        ctx = self._ctx
        staging = ctx.folder / f".backup-media-{os.urandom(4).hex()}"
        media: list[MediaFile] = []
        try:
            if with_media:
                staging.mkdir(mode=0o700)
                media = await self._fetch_media(staging)
            urls = await asyncio.to_thread(read_relay_urls, ctx.store)
            manifest = {
                "username": ctx.me.name,
                "device_id": ctx.me.device_id,
                "relay_url": urls[0] if urls else "",
                "relay_urls": list(urls),
            }
            return await asyncio.to_thread(
                write_backup,
                ctx.store,
                ctx.folder,
                Path(out),
                passphrase,
                manifest,
                media=media,
                kdf_limits=kdf_limits or KDF_MODERATE,
                now_ms=ctx.now_ms,
            )
        finally:
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _fetch_media(self, staging: Path) -> list[MediaFile]:
        ids = await asyncio.to_thread(self._ctx.history.attachment_ids)
        media = []
        for mid in ids:
            path = staging / mid
            try:
                await download_attachment(self._ctx, mid, path, None)
            except (TransportError, E2EEError):
                continue  # expired on the relay or damaged: nothing to keep
            media.append(MediaFile(mid, path))
        return media

    async def recover(self, recovery_key: str) -> None:
        """Re-claim our username with its recovery key instead of ``Client.register``.

        For a new account made with ``Client.create`` under the lost account's name: the
        relay makes this device the name's only device (the old devices are logged out and
        their undelivered messages dropped), then our prekeys are uploaded. Our identity
        key is new, so contacts see an identity change (their safety numbers with us
        change). The old recovery key stays valid until :meth:`new_key` replaces it.

        Args:
            recovery_key: the key as the user typed it (case, spaces and dashes ignored).

        Raises:
            InvalidRecoveryKey: not a recovery key (a typo); nothing was sent.
            RecoveryRefused: the relay refused the key (wrong, none set, or no such name).
            RateLimited: too many attempts for this name or from this address.
            UsageError: this account is registered already.
            TransportError: the relay cannot be reached or refused.
        """
        key = RecoveryKey.parse(recovery_key)
        await recover_account(self._ctx, key, self._auth_key, self._link_factory)

    async def new_key(self) -> str:
        """Make a new recovery key and give the relay its verifier (the earlier key stops
        working). Show the result to the user once: it is not stored anywhere.

        Returns:
            The key, ``XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-XXXX`` (144 random bits).

        Raises:
            NotRegistered: ``Client.register`` was never called.
            TransportError: the relay cannot be reached or refused.
        """
        if not self._ctx.registered:
            raise NotRegistered("register the account with a relay first")
        key = RecoveryKey.generate()
        await set_recovery_key(self._ctx, key)
        return key.text()

    @property
    def has_key(self) -> bool:
        """True once the relay holds the verifier of a recovery key made here."""
        return self._ctx.store.get_meta(META_RECOVERY_SET) == "1"
