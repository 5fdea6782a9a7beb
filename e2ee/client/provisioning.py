"""The new device's side of linking: open a provisioning slot, show the code, wait for the
grant (``PendingLink``).

Invariants:

* Nothing is written to disk here: the new device's keys live in memory until the grant
  arrived and :meth:`e2ee.client.Client.link_device` created the data directory. A link
  that times out or fails leaves nothing behind (the relay drops the slot when it expires).
* The slot's token (it takes the grant) and the X25519 private key (it opens the grant)
  never leave this object; the code carries only the slot id and the public key.
* Waiting polls the relay at ``poll_interval`` (the relay's ``provisioning_poll_rate`` is
  the bound) until ``timeout``; a poll the relay rate-limits waits its ``Retry-After``, and a
  relay that cannot be reached for a moment is polled again, both within ``timeout``. Time
  is a parameter (``monotonic``, ``sleep``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence

from e2ee.client.devices import LinkCode, LinkGrant, NewDeviceKeys, open_grant
from e2ee.client.link import LinkFactory, RelayLink, default_link_factory
from e2ee.errors import LinkNotApproved, UsageError
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.errors import ConnectionFailed, NotFound, RelayRejected
from e2ee.transport.failover import check_relay_urls

__all__ = ["PendingLink"]

# The username a not-yet-linked device's link is made with: only its unsigned provisioning
# calls are made, so it never signs as this name.
_NOBODY = "linking"


class PendingLink:
    """A new device waiting to be approved by an existing device of the account.

    ``pending = await PendingLink.start(relay_url)``; show ``pending.code.text()`` (and its
    QR code); ``grant = await pending.wait(timeout)``; then
    ``await Client.link_device(data_dir, grant, pending.keys)``. Close it when done.
    """

    def __init__(
        self,
        link: RelayLink,
        keys: NewDeviceKeys,
        code: LinkCode,
        token: bytes,
        expires_at: int,
        relay_urls: tuple[str, ...],
    ) -> None:
        """Use :meth:`start`."""
        self._link = link
        self._token = token
        self.keys = keys
        self.code = code
        self.expires_at = expires_at
        self.relay_urls = relay_urls

    def __repr__(self) -> str:
        return f"PendingLink(slot={self.code.slot_id!r}, expires_at={self.expires_at})"

    @classmethod
    async def start(
        cls,
        relay_url: str | Sequence[str],
        *,
        link_factory: LinkFactory | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> PendingLink:
        """Draw this device's keys and open a provisioning slot at the relay.

        Args:
            relay_url: the account's relay (one URL, or its nodes' URLs).
            link_factory: builds the relay link (default: the aiohttp transport).
            random_bytes: the source of the keys.

        Returns:
            The pending link; its :attr:`code` is what the approving device needs.

        Raises:
            UsageError: a bad relay URL.
            RateLimited: too many links started from this address.
            TransportError: the relay cannot be reached or refused (503: too many links in
                progress on the relay).
        """
        urls = check_relay_urls(relay_url)
        keys = NewDeviceKeys.generate(random_bytes)
        signer = DeviceSigner.from_seed(keys.auth_seed, _NOBODY, 1)
        link = (link_factory or default_link_factory)(signer, urls)
        try:
            opened = await link.open_provisioning(keys.auth_key)
        except BaseException:
            await link.aclose()
            raise
        code = LinkCode(opened.slot_id, keys.box_public)
        return cls(link, keys, code, opened.token, opened.expires_at, urls)

    async def wait(
        self,
        timeout: float,
        *,
        poll_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> LinkGrant:
        """Wait until an existing device approved the code; return its grant.

        Args:
            timeout: seconds to wait at most.
            poll_interval: seconds between polls of the relay.
            monotonic, sleep: the clock and the wait (tests pass their own).

        Returns:
            The grant, opened and checked (it names this device's auth key).

        Raises:
            LinkNotApproved: not approved within ``timeout``, or the relay dropped the slot
                (it expired); nothing was registered for this device.
            InvalidLinkGrant: what arrived does not open with our key or is not a grant for
                us (tampered with); the slot is used up: start over.
            TransportError: the relay cannot be reached or refused.
        """
        if timeout <= 0 or poll_interval <= 0:
            raise UsageError("timeout and poll_interval must be positive")
        deadline = monotonic() + timeout
        while True:
            pause = poll_interval
            try:
                sealed = await self._link.take_provisioning(self.code.slot_id, self._token)
            except NotFound:
                raise LinkNotApproved("the link code expired before it was approved") from None
            except (ConnectionFailed, RelayRejected) as exc:
                if isinstance(exc, RelayRejected) and not exc.retryable:
                    raise
                # A 429, a node restarting, a 503: poll again while there is time, after the
                # relay's Retry-After when it gave one.
                sealed = None
                pause = max(poll_interval, float(getattr(exc, "retry_after", 0) or 0))
            if sealed is not None:
                return open_grant(sealed, self.keys)
            left = deadline - monotonic()
            if left <= 0:
                raise LinkNotApproved(f"the link code was not approved within {timeout:g} s")
            await sleep(min(pause, left))

    async def aclose(self) -> None:
        """Close the relay link (idempotent)."""
        await self._link.aclose()
