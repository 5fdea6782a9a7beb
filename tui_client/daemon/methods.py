# Invariants:
# * One method per CLI command, under the CLI's name, with the CLI's checks (tui_client.cli's
#   argument validators, history/search pages) and the CLI's --json records as results. Not
#   methods: the commands that make or replace the account directory the daemon holds open
#   (init, recover, link, backup restore), receive (events are notifications) and daemon.
# * Params are named; every handler reads its params and calls Params.done(), so an unknown
#   or mistyped param is -32602 before anything happens.
# * SDK waits go through the session's bounded() (--network-timeout), as the CLI's do.
"""The daemon's methods: the CLI's commands over JSON-RPC."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2ee.client_errors import IdentityHeld
from tui_client import cli
from tui_client.cli import EXIT_HELD, EXIT_NOT_FOUND, CliError, account_cmds, device_cmds
from tui_client.cli import checks as cli_checks
from tui_client.cli import commands as cli_commands
from tui_client.cli import session as cli_session
from tui_client.daemon.protocol import APP_ERROR_BASE, INVALID_PARAMS, Params, RpcError

if TYPE_CHECKING:
    from tui_client.daemon.server import Connection, Daemon

__all__ = ["METHODS", "Handler"]

Handler = Callable[["Daemon", "Connection", Params], Awaitable[Any]]
#: Method name -> handler; filled by @method below.
METHODS: dict[str, Handler] = {}


def method(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        METHODS[name] = handler
        return handler

    return register


def _records(rows: Sequence[tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
    return [record for record, _human in rows]


@method("subscribe")
async def _subscribe(daemon: Daemon, connection: Connection, params: Params) -> Any:
    ack = params.flag("ack")
    params.done()
    connection.subscribe(ack=ack, after=daemon.events.done)
    daemon.wake()
    return {"subscribed": True, "ack": ack}


@method("unsubscribe")
async def _unsubscribe(daemon: Daemon, connection: Connection, params: Params) -> Any:
    params.done()
    connection.subscribed = False
    return {"subscribed": False}


@method("ack")
async def _ack(daemon: Daemon, connection: Connection, params: Params) -> Any:
    count = params.integer("count", -1)
    params.done()
    if count == -1:
        raise RpcError(INVALID_PARAMS, "missing parameter 'count' (an integer)")
    if not (connection.subscribed and connection.ack):
        raise RpcError(INVALID_PARAMS, "not subscribed with ack")
    more = count - connection.acked
    if count < 0 or more < 0 or more > len(connection.unacked):
        raise RpcError(
            INVALID_PARAMS,
            f"count must be between {connection.acked} and "
            f"{connection.acked + len(connection.unacked)} (notifications received)",
        )
    number = daemon.events.done
    for _ in range(more):
        number = connection.unacked.popleft()
    connection.acked = count
    if more:
        daemon.confirm(number)
        daemon.wake()
    return {"acknowledged": count}


async def _held(daemon: Daemon, target: cli_checks._Target, exc: IdentityHeld) -> RpcError:
    error = await daemon.session.held_error(target.chat_id, exc)
    data: dict[str, Any] = {"exit_status": EXIT_HELD, "error": "IdentityHeld", "user": exc.user}
    if exc.message_id:
        data["message_id"] = exc.message_id
    return RpcError(APP_ERROR_BASE + EXIT_HELD, " ".join(str(error).split()), data)


@method("send")
async def _send(daemon: Daemon, connection: Connection, params: Params) -> Any:
    target = params.chat()
    text = params.required_text("text")
    reply_to = params.text("reply_to")
    params.done()
    assert target is not None
    if not text:
        raise RpcError(INVALID_PARAMS, "the message text is empty")
    session = daemon.session
    if target.group:
        await cli_commands._find_group(session, target.group)
    quote = None if reply_to is None else cli_checks._message_id(reply_to)
    try:
        mid = await session.bounded(
            session.client.send_text(target.to, text, reply_to=quote),
            "the relay to accept the message",
        )
    except IdentityHeld as exc:
        raise await _held(daemon, target, exc) from None
    return {"id": mid}


@method("send-file")
async def _send_file(daemon: Daemon, connection: Connection, params: Params) -> Any:
    target = params.chat()
    path = Path(params.required_text("path"))
    caption = params.text("caption") or ""
    mime = params.text("mime")
    params.done()
    assert target is not None
    if not path.is_file():
        raise CliError(EXIT_NOT_FOUND, f"no such file: {path}")
    session = daemon.session
    if target.group:
        await cli_commands._find_group(session, target.group)
    activity = cli_session._Activity()
    try:
        mid = await session.bounded(
            session.client.send_file(
                target.to, path, mime_type=mime, caption=caption, progress=activity
            ),
            "the relay to accept the file",
            activity=activity,
        )
    except IdentityHeld as exc:
        raise await _held(daemon, target, exc) from None
    return {"id": mid}


@method("download")
async def _download(daemon: Daemon, connection: Connection, params: Params) -> Any:
    mid = cli_checks._message_id(params.required_text("id"))
    out = Path(params.required_text("out"))
    force = params.flag("force")
    params.done()
    return await cli_commands._download(
        daemon.session, mid, out, force, "force", unknown=" (or is not in history)"
    )


@method("read")
async def _read(daemon: Daemon, connection: Connection, params: Params) -> Any:
    target = params.chat()
    params.done()
    assert target is not None
    session = daemon.session
    if target.group:
        await cli_commands._find_group(session, target.group)
    count = await session.client.mark_read(target.chat_id)
    queued = await session.flush_outbox() if count else 0
    return {"type": "read", "chat": target.chat_id, "marked": count, "queued": queued}


@method("history")
async def _history(daemon: Daemon, connection: Connection, params: Params) -> Any:
    target = params.chat()
    limit = params.integer("limit", 50)
    before = params.text("before")
    after = params.text("after")
    params.done()
    assert target is not None
    if before is not None and after is not None:
        raise RpcError(INVALID_PARAMS, "give at most one of 'before' and 'after'")
    rows = await cli.history_page(daemon.session, target, limit=limit, before=before, after=after)
    return _records(rows)


@method("search")
async def _search(daemon: Daemon, connection: Connection, params: Params) -> Any:
    text = params.required_text("text")
    target = params.chat(required=False)
    limit = params.integer("limit", 50)
    before = params.text("before")
    params.done()
    rows = await cli.search_page(daemon.session, text, target=target, limit=limit, before=before)
    return _records(rows)


@method("group")
async def _group(daemon: Daemon, connection: Connection, params: Params) -> Any:
    action = params.required_text("action")
    session = daemon.session
    client = session.client
    if action == "list":
        params.done()
        return [cli_commands._group_record(g) for g in await client.groups()]
    if action == "create":
        name = params.required_text("name")
        members = [cli_checks._username(m) for m in params.strings("members")]
        params.done()
        if not name.strip() or not members:
            raise RpcError(INVALID_PARAMS, "a group needs a name and at least one member")
        try:
            gid = await session.bounded(
                client.create_group(name, members), "the relay to accept the group"
            )
        except IdentityHeld as exc:
            raise _held_group(exc, "the group is created but") from None
        record = cli_commands._group_record(await cli_commands._find_group(session, gid))
        return record | {"type": "group", "action": "create", "by": client.username}
    if action not in ("add", "remove", "leave"):
        raise RpcError(INVALID_PARAMS, "action must be create, add, remove, leave or list")
    gid = cli_checks._group_id(params.required_text("group"))
    user = cli_checks._username(params.required_text("user")) if action != "leave" else None
    params.done()
    await cli_commands._find_group(session, gid)
    if action == "add":
        assert user is not None
        work: Awaitable[None] = client.add_member(gid, user)
    elif action == "remove":
        assert user is not None
        work = client.remove_member(gid, user)
    else:
        work = client.leave_group(gid)
    try:
        await session.bounded(work, "the relay to accept the group change")
    except IdentityHeld as exc:
        raise _held_group(exc, "the change is queued;") from None
    record = cli_commands._group_record(await cli_commands._find_group(session, gid))
    return record | {"type": "group", "action": action, "by": client.username}


def _held_group(exc: IdentityHeld, what: str) -> RpcError:
    return RpcError(
        APP_ERROR_BASE + EXIT_HELD,
        f"the identity key of {exc.user} changed: {what} {exc.user} is told only after "
        f"'trust' {exc.user}",
        {"exit_status": EXIT_HELD, "error": "IdentityHeld", "user": exc.user},
    )


@method("safety-number")
async def _safety_number(daemon: Daemon, connection: Connection, params: Params) -> Any:
    user = cli_checks._username(params.required_text("user"))
    params.done()
    client = daemon.session.client
    levels = await cli_commands._known_levels(daemon.session, user)
    return [
        {
            "type": "safety_number",
            "user": user,
            "device": device,
            "digits": number.digits,
            "trust": levels.get(device, "none"),
            "scannable": base64.b64encode(number.scannable).decode("ascii"),
        }
        for device, number in await client.safety_number(user)
    ]


async def _accept(daemon: Daemon, params: Params, *, verified: bool) -> Any:
    user = cli_checks._username(params.required_text("user"))
    params.done()
    session = daemon.session
    client = session.client
    before = cli_commands._overall_trust(await cli_commands._known_levels(session, user))
    if not verified and before != "untrusted":
        return {"type": "trust", "user": user, "trust": before, "changed": False, "sent": 0}
    queued = len(await asyncio.to_thread(session.history.pending_outbox))
    await client.accept_identity(user, verified=verified)
    after = cli_commands._overall_trust(await client.trust_level(user))
    still = await session.flush_outbox() if queued else 0
    return {
        "type": "trust",
        "user": user,
        "trust": after,
        "changed": True,
        "sent": max(queued - still, 0),
        "queued": still,
    }


@method("trust")
async def _trust(daemon: Daemon, connection: Connection, params: Params) -> Any:
    return await _accept(daemon, params, verified=False)


@method("verify")
async def _verify(daemon: Daemon, connection: Connection, params: Params) -> Any:
    return await _accept(daemon, params, verified=True)


@method("contacts")
async def _contacts(daemon: Daemon, connection: Connection, params: Params) -> Any:
    params.done()
    contacts = await daemon.session.client.contacts()
    return [
        {
            "type": "contact",
            "user": user,
            "trust": cli_commands._overall_trust(levels),
            "devices": {str(d): t for d, t in sorted(levels.items())},
        }
        for user, levels in sorted(contacts.items())
    ]


@method("devices")
async def _devices(daemon: Daemon, connection: Connection, params: Params) -> Any:
    action = params.text("action") or "list"
    session = daemon.session
    devices = session.client.devices
    if action == "list":
        params.done()
        listed = await session.bounded(devices.list(), "the relay's device list")
        return [device_cmds.device_record(d) for d in listed]
    if action == "add":
        code = params.required_text("code")
        name = params.text("name") or ""
        with_history = params.flag("with_history")
        params.done()
        # Not bounded by --network-timeout: with the history it is a transfer (as in the CLI).
        grant = await devices.approve(code, name=name, with_history=with_history)
        return device_cmds.device_added_record(grant)
    if action == "remove":
        device_id = params.integer("id", -1)
        force = params.flag("force")
        params.done()
        if device_id < 1:
            raise RpcError(INVALID_PARAMS, "'id' must be a device id (a positive integer)")
        device_cmds.check_removal(session.client, device_id, force)
        await session.bounded(devices.remove(device_id), "the relay to remove the device")
        return {"type": "device_removed", "id": device_id}
    raise RpcError(INVALID_PARAMS, "'action' must be list, add or remove")


@method("recovery-key")
async def _recovery_key(daemon: Daemon, connection: Connection, params: Params) -> Any:
    params.done()
    client = daemon.session.client
    key = await daemon.session.bounded(client.recovery.new_key(), "the relay to set the key")
    return account_cmds.recovery_key_record(client.username, key)


@method("backup")
async def _backup(daemon: Daemon, connection: Connection, params: Params) -> Any:
    action = params.required_text("action")
    if action == "restore":
        raise RpcError(
            INVALID_PARAMS,
            "a backup is restored into a new data directory: run 'blindpost backup restore' there",
        )
    if action != "create":
        raise RpcError(INVALID_PARAMS, "'action' must be create")
    out = Path(params.required_text("out"))
    with_media = params.flag("with_media")
    params.done()
    passphrase = account_cmds._backup_passphrase(daemon.session.settings)
    info = await daemon.session.client.recovery.backup(out, passphrase, with_media=with_media)
    return account_cmds.backup_record(info)


@method("sealed")
async def _sealed(daemon: Daemon, connection: Connection, params: Params) -> Any:
    action = params.text("action") or "status"
    params.done()
    if action not in account_cmds.SEALED_ACTIONS:
        raise RpcError(INVALID_PARAMS, "'action' must be status, refuse, accept or rotate")
    session = daemon.session
    return await account_cmds.apply_sealed(
        session.client.sealed, action, session.settings.network_timeout
    )
