# Invariant: these checks are pure (no I/O, no mutation), so every backend validates a write
# the same way, completely, before it changes anything.
"""Validation rules shared by every ``RelayStore`` backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from relay.errors import MailboxFull, MismatchedDevices
from relay.store.base import Address

__all__ = ["check_quota", "resolve_recipients"]

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
