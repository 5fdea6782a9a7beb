# Invariant: these checks are pure (no I/O, no mutation), so every backend validates a write
# the same way, completely, before it changes anything.
"""Validation rules shared by every ``RelayStore`` backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from relay.errors import MailboxFull, MismatchedDevices, SenderShareExceeded
from relay.store.base import Address, StoreLimits

__all__ = ["check_quota", "check_sender_share", "resolve_recipients"]

K = TypeVar("K")


def resolve_recipients(
    sender: Address,
    recipients: Sequence[Address],
    devices_of: Callable[[str], Mapping[int, K] | None],
) -> list[tuple[Address, K]]:
    """Check that a send names exactly each recipient user's current devices.

    The sender's own device is never a recipient; its other devices are (self-sync).

    Args:
        sender: the sending device.
        recipients: the envelope's recipient devices.
        devices_of: a user's registered devices (device id -> backend key), None if unknown.

    Returns:
        (address, backend key) per recipient device.

    Raises:
        MismatchedDevices: unknown users, missing or stale devices.
    """
    wanted: dict[str, set[int]] = {}
    for r in recipients:
        wanted.setdefault(r.user, set()).add(r.device)
    unknown: list[str] = []
    missing: dict[str, list[int]] = {}
    stale: dict[str, list[int]] = {}
    targets: list[tuple[Address, K]] = []
    for user, devs in wanted.items():
        registered_map = devices_of(user)
        if registered_map is None:
            unknown.append(user)
            continue
        registered = set(registered_map)
        if user == sender.user:
            registered.discard(sender.device)
        if devs != registered:
            if registered - devs:
                missing[user] = sorted(registered - devs)
            if devs - registered:
                stale[user] = sorted(devs - registered)
            continue
        for d in devs:
            targets.append((Address(user, d), registered_map[d]))
    if unknown or missing or stale:
        raise MismatchedDevices(unknown, missing, stale)
    return targets


def check_quota(
    targets: Sequence[tuple[Address, K]],
    usage_of: Callable[[K], Sequence[int]],
    size: int,
    max_messages: int,
    max_bytes: int,
) -> None:
    """Refuse a send that would overfill any recipient's mailbox.

    Args:
        targets: as returned by ``resolve_recipients``.
        usage_of: a mailbox's current (message count, bytes).
        size: the body size.
        max_messages: per-mailbox message quota.
        max_bytes: per-mailbox byte quota.

    Raises:
        MailboxFull: listing every full recipient device, sorted.
    """
    full = []
    for addr, key in targets:
        count, used = usage_of(key)[:2]
        if count + 1 > max_messages or used + size > max_bytes:
            full.append((addr.user, addr.device))
    if full:
        raise MailboxFull(sorted(full))


def check_sender_share(
    sender: str,
    targets: Sequence[tuple[Address, K]],
    share_of: Callable[[K], Sequence[int]],
    answered: Callable[[str], bool],
    size: int,
    limits: StoreLimits,
) -> None:
    """Refuse a send that would take the sender past its share of any recipient's mailbox.

    A sender may hold at most ``sender_max_messages`` / ``sender_max_bytes`` of one mailbox
    if the recipient's account has ever sent to the sender's account ("answered"), else the
    stricter ``stranger_max_*``. The sender's own devices (self-sync) are exempt: an account
    filling its own mailboxes harms nobody else.

    Args:
        sender: the sending username.
        targets: as returned by ``resolve_recipients``.
        share_of: the sender's current (message count, bytes) in a mailbox.
        answered: whether a recipient user has ever sent to ``sender``.
        size: the body size.
        limits: the store's limits.

    Raises:
        SenderShareExceeded: listing every such recipient device, sorted.
    """
    over = []
    verdict: dict[str, bool] = {}
    for addr, key in targets:
        if addr.user == sender:
            continue
        known = verdict.get(addr.user)
        if known is None:
            known = verdict[addr.user] = answered(addr.user)
        if known:
            max_messages, max_bytes = limits.sender_max_messages, limits.sender_max_bytes
        else:
            max_messages, max_bytes = limits.stranger_max_messages, limits.stranger_max_bytes
        count, used = share_of(key)[:2]
        if count + 1 > max_messages or used + size > max_bytes:
            over.append((addr.user, addr.device))
    if over:
        raise SenderShareExceeded(sorted(over))
