"""Account creation and registration with the relay.

Invariants:

* A client's context is built here from an opened data directory
  (:func:`client_context`): the device's auth key and the relay link.
* Creating an account writes the identity keys and the SDK's settings to a new
  store in one go (:func:`create_account_dir`); nothing reaches the relay then.
* Registration is resumable: the relay's account is created once (recorded as
  ``sdk.account_created`` at once, because names are never reused), the prekey
  upload may be retried, and ``sdk.registered`` is recorded only after it.
* Recovery is registration with another first step: the relay hands the name to
  this device when a request signed with the recovery key verifies, then the
  same resumable key upload follows. The recovery key is never stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

from e2ee.client.backup import META_RESTORED_FROM
from e2ee.client.context import ClientContext, ClientOptions
from e2ee.client.datadir import (
    META_ACCOUNT_CREATED,
    META_READ_RECEIPTS,
    META_RECOVERY_SET,
    META_REGISTERED,
    META_STRICT,
    META_USER,
    Opened,
    device_auth_seed,
    open_dir,
    read_relay_urls,
    relay_meta,
    starting_at,
)
from e2ee.client.link import LinkFactory
from e2ee.core import ProtocolEngine
from e2ee.core.recovery import RecoveryKey
from e2ee.errors import StorageError, UsageError
from e2ee.store import Changes
from e2ee.store.sealing import KdfLimits
from e2ee.store.sqlite import SQLiteProtocolStore
from e2ee.transport.auth import DeviceSigner, check_device_id

__all__ = [
    "client_context",
    "create_account_dir",
    "finish_restore",
    "recover_account",
    "register_account",
    "set_recovery_key",
]


def client_context(
    opened: Opened,
    link_factory: LinkFactory,
    *,
    now_ms: Callable[[], int],
    options: ClientOptions,
    random_bytes: Callable[[int], bytes],
    jitter: Callable[[], float],
) -> tuple[ClientContext, bytes]:
    """The context of an opened account with its relay link; and the device's auth key.

    The link starts at the node the last run ended on (a dead first node costs
    nothing twice).
    """
    account = opened.account
    signer = DeviceSigner.from_seed(
        device_auth_seed(opened.store, account), account.name, account.device_id
    )
    link = link_factory(signer, starting_at(opened.relay_urls, opened.relay_last))
    ctx = ClientContext(
        opened, link, now_ms=now_ms, random_bytes=random_bytes, jitter=jitter, options=options
    )
    return ctx, signer.public_key


def create_account_dir(
    folder: Path,
    username: str,
    relay_urls: Sequence[str],
    *,
    device_id: int,
    passphrase: str | None,
    strict_trust: bool,
    now_ms: Callable[[], int],
    kdf_limits: KdfLimits | None,
) -> Opened:
    """Create the directory and a new account in it (blocking; run in a thread).

    Raises:
        UsageError: bad name or device id, or the directory already holds an account.
        StoreLocked: another process has the directory open.
        StorageError: the directory or database cannot be created.
    """
    check_device_id(device_id)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StorageError(f"cannot create {folder}: {exc.strerror}") from exc

    def init(store: SQLiteProtocolStore) -> None:
        engine = ProtocolEngine(store, now_ms=now_ms, trust_on_first_use=not strict_trust)
        engine.create_account(username, device_id)
        store.commit(
            Changes(
                meta_put={
                    META_USER: username,
                    **relay_meta(relay_urls),
                    META_STRICT: "1" if strict_trust else "0",
                    META_READ_RECEIPTS: "1",
                }
            )
        )

    return open_dir(folder, passphrase, kdf_limits, now_ms, init)


async def register_account(ctx: ClientContext, invite: str | None = None) -> None:
    """Create the account on the relay (once) and upload the prekeys.

    Args:
        ctx: the client's context.
        invite: an invite code from the relay's operator (invite-only relays).

    Raises:
        UsernameTaken: the name is registered already.
        RegistrationRefused: closed relay, invite required or invalid (its subclasses).
        TransportError: the relay cannot be reached or refused.
        StorageError: the store cannot be written.
    """
    await asyncio.to_thread(ctx.load_state)
    created = await asyncio.to_thread(ctx.store.get_meta, META_ACCOUNT_CREATED)
    if not ctx.registered and created != "1":
        await ctx.link.register(invite)
        # Recorded at once: names are never reused, so a retry after a failed
        # key upload must not register (and lose) the name again.
        await asyncio.to_thread(ctx.store.commit, Changes(meta_put={META_ACCOUNT_CREATED: "1"}))
    upload = await asyncio.to_thread(ctx.locked, ctx.engine.key_upload)
    await ctx.link.upload_keys(upload.to_json())
    await asyncio.to_thread(ctx.store.commit, Changes(meta_put={META_REGISTERED: "1"}))
    ctx.registered = True


async def recover_account(
    ctx: ClientContext, key: RecoveryKey, auth_key: bytes, link_factory: LinkFactory
) -> None:
    """Re-claim our username at the relay with its recovery key, then upload our prekeys.

    The relay makes this device (our device id, ``auth_key``) the account's only device.

    Args:
        ctx: the client's context (a new account, not registered yet).
        key: the account's recovery key.
        auth_key: this device's Ed25519 public auth key.
        link_factory: builds the one-off link signed with the recovery key.

    Raises:
        UsageError: this device is registered already.
        RecoveryRefused: wrong key, none set, or no such account.
        RateLimited: too many attempts for this name or from this address.
        TransportError: the relay cannot be reached or refused.
        StorageError: the store cannot be written.
    """
    await asyncio.to_thread(ctx.load_state)
    if ctx.registered:
        raise UsageError("this device is registered already")
    signer = DeviceSigner.from_seed(key.signing_seed(), ctx.me.name, ctx.me.device_id)
    urls = await asyncio.to_thread(read_relay_urls, ctx.store)
    link = link_factory(signer, urls)
    try:
        await link.recover(auth_key)
    finally:
        await link.aclose()
    await asyncio.to_thread(ctx.store.commit, Changes(meta_put={META_ACCOUNT_CREATED: "1"}))
    await register_account(ctx)


async def set_recovery_key(ctx: ClientContext, key: RecoveryKey) -> None:
    """Give the relay the verifier of ``key`` (replacing the account's earlier one).

    Raises:
        TransportError: the relay cannot be reached or refused.
        StorageError: the store cannot be written.
    """
    await ctx.link.set_recovery(key.verifier())
    await asyncio.to_thread(ctx.store.commit, Changes(meta_put={META_RECOVERY_SET: "1"}))


async def finish_restore(
    ctx: ClientContext, old_device: int, auth_key: bytes, link_factory: LinkFactory
) -> None:
    """Tell the relay that this restored device replaces the account's devices.

    Signed with the backed-up device's credentials (the auth key derives from the identity
    key, which the restore kept); repeating it after an interruption is harmless.

    Raises:
        TransportError: the relay cannot be reached or refused (``AuthFailed`` when the
            backed-up device is no longer registered: recover with the recovery key).
        StorageError: the store cannot be written.
    """
    account = await asyncio.to_thread(ctx.store.load_account)
    if account is None:
        raise UsageError("no account in this store")
    seed = await asyncio.to_thread(device_auth_seed, ctx.store, account)
    signer = DeviceSigner.from_seed(seed, account.name, old_device)
    urls = await asyncio.to_thread(read_relay_urls, ctx.store)
    link = link_factory(signer, urls)
    try:
        await link.reset_devices(ctx.me.device_id, auth_key)
    finally:
        await link.aclose()
    await asyncio.to_thread(ctx.store.commit, Changes(meta_put={META_RESTORED_FROM: ""}))
