# Invariants:
# * Every command works on the store of a stopped or a running relay: with store = sqlite it
#   opens the data directory's SQLite file as one more writer (SQLite's locking and the relay's
#   data_version check keep both consistent); with store = postgres (from --config or the
#   environment) the shared database, like one more node. It changes nothing but the rows it
#   names.
# * Output is for operators: one line per item, no secrets but the invite code just created
#   (printed once, never stored; only its SHA-256 is kept). Errors are one line on stderr
#   with a non-zero exit status, never a traceback.
"""Operator commands on accounts: ``invite create|list`` and ``admin ban|unban USER``.

Both join relay.admin's command registry (relay/__main__.py's ``COMMAND_GROUPS``):
``register_invite`` is the ``invite`` group, ``register_admin`` adds to the ``admin`` group.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay.config import ConfigError, RelayConfig
from relay.errors import RelayError
from relay.integrity import DB_NAME
from relay.registration import invite_hash, new_invite_code
from relay.store.base import RelayStore
from relay.wire import parse_username

__all__ = ["register_admin", "register_invite", "run_command"]

Command = Callable[[argparse.Namespace, RelayStore], Awaitable[int]]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="the relay's data directory [from config]")
    parser.add_argument("--config", type=Path, help="TOML config file (for data_dir)")


def register_invite(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``create`` and ``list`` to the ``invite`` group (single-use invite codes).

    Args:
        sub: the ``invite`` group's ``add_subparsers()`` result.
    """
    create = sub.add_parser("create", help="create invite codes and print them")
    _common(create)
    create.add_argument(
        "--ttl", type=float, help="seconds the code stays valid [invite_ttl_seconds: 7 days]"
    )
    create.add_argument("--count", type=int, default=1, help="how many codes [1]")
    create.set_defaults(func=run_command, run=_invite_create)
    listing = sub.add_parser("list", help="list invites (id, created, expires, used by)")
    _common(listing)
    listing.set_defaults(func=run_command, run=_invite_list)


def register_admin(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ban USER`` and ``unban USER`` to the ``admin`` subcommand set.

    Args:
        subparsers: the ``admin`` command's ``add_subparsers()`` result.
    """
    for name, helptext in (
        ("ban", "refuse every request and WebSocket of USER (403 account_banned / close 4403)"),
        ("unban", "lift a ban"),
    ):
        parser = subparsers.add_parser(name, help=helptext)
        parser.add_argument("user", help="username")
        _common(parser)
        parser.set_defaults(func=run_command, run=_ban if name == "ban" else _unban)


def _fmt(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _invite_create(args: argparse.Namespace, store: RelayStore) -> int:
    ttl = args.ttl if args.ttl is not None else args.cfg.invite_ttl_seconds
    if ttl <= 0 or not 1 <= args.count <= 10_000:
        print("blindpost-relay: --ttl must be positive, --count 1..10000", file=sys.stderr)
        return 2
    now = _now_ms()
    for _ in range(args.count):
        code = new_invite_code()
        await store.create_invite(invite_hash(code), now, now + int(ttl * 1000))
        print(code)
    return 0


async def _invite_list(args: argparse.Namespace, store: RelayStore) -> int:
    now = _now_ms()
    print(f"{'id':<12}  {'created':<20}  {'expires':<20}  state")
    for inv in await store.list_invites():
        if inv.used_by is not None:
            state = f"used by {inv.used_by} at {_fmt(inv.used_at)}"
        elif inv.expires_at < now:
            state = "expired"
        else:
            state = "unused"
        print(f"{inv.id:<12}  {_fmt(inv.created_at):<20}  {_fmt(inv.expires_at):<20}  {state}")
    return 0


async def _set_ban(args: argparse.Namespace, store: RelayStore, banned: bool) -> int:
    user = parse_username(args.user)
    if not await store.set_banned(user, banned, _now_ms()):
        print(f"blindpost-relay: no user {user!r}", file=sys.stderr)
        return 1
    print(f"{user}: {'banned' if banned else 'not banned'}")
    return 0


async def _ban(args: argparse.Namespace, store: RelayStore) -> int:
    return await _set_ban(args, store, True)


async def _unban(args: argparse.Namespace, store: RelayStore) -> int:
    return await _set_ban(args, store, False)


async def _run(args: argparse.Namespace) -> int:
    cfg: RelayConfig = args.cfg
    store: RelayStore
    if cfg.store == "sqlite":
        from relay.store.sqlite import SqliteRelayStore

        path = cfg.data_dir / DB_NAME
        if not path.exists():
            print(f"blindpost-relay: no relay database at {path}", file=sys.stderr)
            return 1
        store = SqliteRelayStore(path)
    else:
        from relay.backends import make_store

        store = make_store(cfg)
    await store.open()
    try:
        run: Command = args.run
        return await run(args, store)
    finally:
        await store.close()


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command of this module (``args.run`` set by ``register*``).

    Returns:
        Exit status: 0 done, 1 failed (message on stderr), 2 bad arguments or settings.
    """
    try:
        args.cfg = RelayConfig.load(args.config, overrides={"data_dir": args.data})
    except ConfigError as exc:
        print(f"blindpost-relay: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except RelayError as exc:
        print(f"blindpost-relay: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"blindpost-relay: {exc}", file=sys.stderr)
        return 1
