# Invariants (docs/architecture.md, "Relay nodes"):
# * The store is the truth, Redis only signals. A node pushes a live message only after reading
#   it from the store, per device, after the socket's last pushed seq (or, for its own commit,
#   when it is exactly the socket's next seq): so a connection receives every message in seq
#   order whichever node committed it, and a lost signal costs a delay
#   (the next wake, the resync after a reconnect, or the safety poll of ``redis_poll_seconds``),
#   never a message.
# * Presence: ``<prefix>presence:<device>:<user>`` holds "<node> <connection token>" with a TTL
#   (``redis_presence_ttl_seconds``) that the holding node refreshes every
#   ``redis_heartbeat_seconds``; a dead node's entries expire by themselves.
# * One live connection per device across nodes: an attach is one atomic SET ... GET; the
#   previous holder (the value it replaced) is told on its node channel, in the same script, to
#   close exactly that connection with 4001. Redis orders the SETs, so of two crossing attaches
#   exactly one survives, with no clocks compared. A refresh finding another holder closes the
#   local socket too, so a lost kick is repaired within one heartbeat.
# * A commit wakes remote recipients with one script per batch (presence lookup and PUBLISH on
#   the server): one Redis round trip per commit batch, whatever its size. A wake-up carries the
#   encoded DELIVER of each small message (``redis_wake_body_bytes``); the woken node pushes it
#   without reading the store only when it is exactly the socket's next seq, else it reads the
#   store as for a bare wake-up: the same order and exactly-once rule as a node's own commits.
# * Device removal is broadcast; a node that may have missed it (it re-subscribed) forgets every
#   cached auth key and re-checks every local socket's device in the store.
# * A node whose Redis is unreachable is not ready: it refuses what needs Redis (new sockets,
#   sends, device removal) with 503 + Retry-After, and recovers by itself when Redis answers.
"""A relay node's link to the others through Redis (presence, wake-ups, 4001, removal)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from relay.config import RelayConfig
from relay.errors import RelayError, Unavailable
from relay.hub import CLOSE_DEVICE_REMOVED, CLOSE_REPLACED, Connection
from relay.nodes.state import connect
from relay.state import RelayState
from relay.store.base import Address, Delivery
from relay.wire import encode_deliver

__all__ = ["NodeLink"]

log = logging.getLogger("relay.nodes")

_PAGE = 256  # messages per store read of the push pump
_PAGE_BYTES = 1024 * 1024
_PUMP_BATCH = 256  # devices read concurrently by the push pump
_SCRIPT_KEYS = 500  # presence keys per script call (bounds one script's time on the server)
_WAKE_CARRIED = 32  # messages per device one wake-up carries at most (more: a bare wake-up)
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)

# KEYS[1] presence key. ARGV: value "<node> <token>", ttl ms, node channel prefix, "<dev> <user>".
# Replaces the holder and tells the previous one (another connection) to close: 4001.
_ATTACH = """
local old = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'GET')
if old and old ~= ARGV[1] then
  local sp = string.find(old, ' ', 1, true)
  if sp then
    redis.call('PUBLISH', ARGV[3] .. string.sub(old, 1, sp - 1),
      'K ' .. string.sub(old, sp + 1) .. ' ' .. ARGV[4])
  end
end
return old
"""

# KEYS presence keys; ARGV ttl ms, then one value per key. Refreshes the TTL where the value is
# ours, re-registers where the key vanished (expired, or Redis restarted empty), and returns the
# 1-based indices of keys another connection holds now (their local socket must close).
_REFRESH = """
local lost = {}
for i, k in ipairs(KEYS) do
  local v = ARGV[i + 1]
  local cur = redis.call('GET', k)
  if cur == v then
    redis.call('PEXPIRE', k, ARGV[1])
  elseif not cur then
    redis.call('SET', k, v, 'PX', ARGV[1])
  else
    table.insert(lost, i)
  end
end
return lost
"""

# KEYS presence keys; ARGV one value per key: deletes each key still holding that value.
_RELEASE = """
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[i] then redis.call('DEL', k) end
end
return 0
"""

# KEYS presence keys of recipients; ARGV node channel prefix, own node id, then the lines for
# each key: "W <seq> <dev> <user>" (read the store up to seq), or one "D <seq> <dev> <user>
# <base64 DELIVER>" per carried message, joined by newlines. Publishes, per holding node other
# than ours, one message of all its lines. Returns the number of nodes woken.
_WAKE = """
local groups = {}
local order = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v then
    local sp = string.find(v, ' ', 1, true)
    if sp then
      local node = string.sub(v, 1, sp - 1)
      if node ~= ARGV[2] then
        local g = groups[node]
        if g == nil then
          g = {}
          groups[node] = g
          table.insert(order, node)
        end
        table.insert(g, ARGV[i + 2])
      end
    end
  end
end
for _, node in ipairs(order) do
  redis.call('PUBLISH', ARGV[1] .. node, table.concat(groups[node], '\\n'))
end
return #order
"""


class NodeLink:
    """Coordinates one relay node with the others through Redis.

    Args:
        state: the node's relay state (hub, store, cached auth keys).
        config: settings: ``redis_url``, ``redis_prefix``, ``redis_heartbeat_seconds``,
            ``redis_presence_ttl_seconds``, ``redis_poll_seconds``, ``redis_timeout_seconds``,
            ``redis_retry_after_seconds``.
    """

    def __init__(self, state: RelayState, config: RelayConfig) -> None:
        self._state = state
        self._config = config
        self.node_id = secrets.token_hex(6)
        prefix = config.redis_prefix
        self._presence_prefix = f"{prefix}presence:"
        self._channel_prefix = f"{prefix}node:"
        self._channel = self._channel_prefix + self.node_id
        self._removed_channel = f"{prefix}removed"
        self._ttl_ms = int(config.redis_presence_ttl_seconds * 1000)
        self._timeout = config.redis_timeout_seconds
        self.redis: Redis = connect(config.redis_url, self._timeout)
        self._sub_redis: Redis = connect(config.redis_url, self._timeout, subscriber=True)
        self._attach_script = self.redis.register_script(_ATTACH)
        self._refresh_script = self.redis.register_script(_REFRESH)
        self._release_script = self.redis.register_script(_RELEASE)
        self._wake_script = self.redis.register_script(_WAKE)
        self._serial = 0
        self._commands_ok = False
        self._subscribed = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty: set[Address] = set()
        self._pump_task: asyncio.Task[None] | None = None
        # Remote recipients of this node's commits, for the next wake-up: the highest seq, and
        # the encoded messages it carries (None once one did not fit: a bare wake-up).
        self._outgoing: dict[Address, tuple[int, list[tuple[int, bytes]] | None]] = {}
        self._carry_max = config.redis_wake_body_bytes
        self._wake_task: asyncio.Task[None] | None = None
        self._releases: dict[str, str] = {}
        self._release_task: asyncio.Task[None] | None = None
        self._removals: list[Address] = []
        self._metrics = state.metrics  # the redis_* counters

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """True while Redis answers and this node is subscribed to its channels (no I/O)."""
        return self._commands_ok and self._subscribed and not self._closing

    async def ready(self) -> str | None:
        """Readiness check for ``/healthz/ready`` (relay.health's ``SupportsReady``): Redis
        answers a PING now and this node is subscribed.

        Returns:
            None when ready, else a short reason (no URL: it may hold a password).
        """
        if self._closing:
            return "shutting down"
        if not self._subscribed:
            return "not subscribed to Redis"
        try:
            await asyncio.wait_for(self.redis.ping(), self._timeout)
        except _REDIS_ERRORS:
            self._set_commands_ok(False)
            return "Redis does not answer"
        self._set_commands_ok(True)
        return None

    def unavailable(self) -> Unavailable:
        """The 503 this node answers while it is not ready."""
        return Unavailable(self._config.redis_retry_after_seconds, "relay node lost Redis")

    def require_ready(self) -> None:
        """Raise the 503 unless ready.

        Raises:
            Unavailable: Redis is unreachable.
        """
        if not self.is_ready:
            raise self.unavailable()

    async def start(self) -> None:
        """Take over the store's delivery listener and the hub's hooks, and start the link's
        tasks. Never fails because Redis is down: the node starts not-ready and recovers."""
        st = self._state
        st.store.set_delivery_listener(self._on_commit)
        st.hub.detach_listener = self._on_detach
        st.node = self
        with contextlib.suppress(*_REDIS_ERRORS):
            await asyncio.wait_for(self.redis.ping(), self._timeout)
            self._commands_ok = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen()),
            loop.create_task(self._heartbeat()),
            loop.create_task(self._poll()),
        ]
        log.info("relay node %s linked through Redis (channel %r)", self.node_id, self._channel)

    def stop_pushing(self) -> None:
        """Shutdown, before the store closes: stop reading it and stop the link's tasks."""
        self._closing = True
        for task in (*self._tasks, self._pump_task):
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        """After the store closed: wake other nodes for its last commits, release this node's
        presence entries, and close the Redis clients."""
        self.stop_pushing()
        for task in (*self._tasks, self._pump_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for task in (self._wake_task, self._release_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(*_REDIS_ERRORS):
            await asyncio.wait_for(self._flush_wakes(), self._timeout)
            await asyncio.wait_for(self._flush_releases(), self._timeout)
        st = self._state
        st.hub.detach_listener = None
        st.node = None
        await self._sub_redis.aclose()
        await self.redis.aclose()

    def _set_commands_ok(self, ok: bool) -> None:
        if ok != self._commands_ok:
            self._commands_ok = ok
            if ok:
                log.info("relay node %s: Redis answers again", self.node_id)
            else:
                log.warning("relay node %s: Redis unreachable, not ready", self.node_id)

    # -- presence and the 4001 rule --------------------------------------------------------

    def _key(self, addr: Address) -> str:
        return f"{self._presence_prefix}{addr.device}:{addr.user}"

    async def attach(self, conn: Connection) -> None:
        """Register ``conn`` (already attached to the local hub) as its device's connection
        across nodes; the previous holder elsewhere closes with 4001.

        Raises:
            Unavailable: Redis is unreachable (the caller closes the socket).
        """
        self.require_ready()
        self._serial += 1
        conn.token = f"{self._serial}"
        addr = conn.addr
        value = f"{self.node_id} {conn.token}"
        try:
            await asyncio.wait_for(
                self._attach_script(
                    keys=[self._key(addr)],
                    args=[value, self._ttl_ms, self._channel_prefix, f"{addr.device} {addr.user}"],
                ),
                self._timeout,
            )
        except _REDIS_ERRORS as exc:
            self._set_commands_ok(False)
            raise self.unavailable() from exc

    def _on_detach(self, conn: Connection) -> None:
        if not conn.token:
            return
        self._releases[self._key(conn.addr)] = f"{self.node_id} {conn.token}"
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.get_running_loop().create_task(self._releaser())

    async def _releaser(self) -> None:
        with contextlib.suppress(*_REDIS_ERRORS):  # if lost, the entry expires by its TTL
            await self._flush_releases()

    async def _flush_releases(self) -> None:
        while self._releases:
            batch = dict(list(self._releases.items())[:_SCRIPT_KEYS])
            for key in batch:
                del self._releases[key]
            await asyncio.wait_for(
                self._release_script(keys=list(batch), args=list(batch.values())), self._timeout
            )

    async def _refresh(self) -> None:
        conns = [c for c in self._state.hub.connections() if c.token and not c.closing]
        for i in range(0, len(conns), _SCRIPT_KEYS):
            chunk = conns[i : i + _SCRIPT_KEYS]
            lost = await asyncio.wait_for(
                self._refresh_script(
                    keys=[self._key(c.addr) for c in chunk],
                    args=[self._ttl_ms, *(f"{self.node_id} {c.token}" for c in chunk)],
                ),
                self._timeout,
            )
            for index in lost or ():
                conn = chunk[int(index) - 1]
                log.info(
                    "closing replaced connection user=%s device=%d (newer on another node)",
                    conn.addr.user,
                    conn.addr.device,
                )
                self._state.hub.kick(conn, CLOSE_REPLACED, "replaced by a newer connection")

    async def _heartbeat(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.redis.ping(), self._timeout)
                self._set_commands_ok(True)
                await self._flush_removals()
                await self._refresh()
            except _REDIS_ERRORS:
                self._set_commands_ok(False)
            await asyncio.sleep(self._config.redis_heartbeat_seconds)

    # -- wake-ups ----------------------------------------------------------------------------

    def _on_commit(self, deliveries: Sequence[Delivery]) -> None:
        # The store's listener: this node committed these (increasing seq).
        # A local socket whose next seq this is gets it at once: no seq can be missing in
        # between, so no other node's commit can still be on its way (the common case on one
        # node, and what keeps it as fast as a single relay). Anything else is read from the
        # store after the socket's last pushed seq.
        hub = self._state.hub
        get = hub.get
        direct: list[Delivery] = []
        expect: dict[Address, int] = {}
        for d in deliveries:
            addr = d.recipient
            seq = d.message.seq
            conn = get(addr)
            if conn is not None:
                if conn.live and seq == expect.get(addr, conn.last_seq + 1):
                    direct.append(d)
                    expect[addr] = seq + 1
                else:
                    self._mark(addr, seq)
            else:
                self._carry(addr, d)
        if direct:
            hub.deliver(direct)
        if self._outgoing and (self._wake_task is None or self._wake_task.done()):
            self._wake_task = asyncio.get_running_loop().create_task(self._waker())

    def _carry(self, addr: Address, d: Delivery) -> None:
        # Queue a remote recipient's message for the next wake-up, carrying its encoded DELIVER
        # when small enough (the woken node then pushes it without a store read).
        seq = d.message.seq
        last, carried = self._outgoing.get(addr, (0, []))
        if seq <= last:
            return
        if carried is not None:
            payload = b""
            if len(carried) < _WAKE_CARRIED and len(d.message.body) <= self._carry_max:
                try:
                    payload = encode_deliver(d.message)
                except RelayError:
                    payload = b""
            if payload and len(payload) <= self._carry_max:
                carried.append((seq, payload))
            else:
                carried = None
        self._outgoing[addr] = (seq, carried)

    async def _waker(self) -> None:
        # Commits made while one call is under way go out together in the next: batches grow
        # with the load, the calls per message shrink.
        try:
            await self._flush_wakes()
        except _REDIS_ERRORS as exc:
            # Lost wake-ups: the recipients' nodes push at their next resync or poll.
            log.warning("wake-up failed (%s); other nodes poll", type(exc).__name__)
            self._outgoing.clear()
            self._set_commands_ok(False)

    async def _flush_wakes(self) -> None:
        while self._outgoing:
            batch = list(self._outgoing.items())[:_SCRIPT_KEYS]
            for addr, _ in batch:
                del self._outgoing[addr]
            self._metrics.redis_wake_calls += 1
            self._metrics.redis_woken_devices += len(batch)
            await asyncio.wait_for(
                self._wake_script(
                    keys=[self._key(a) for a, _ in batch],
                    args=[
                        self._channel_prefix,
                        self.node_id,
                        *(_wake_lines(a, seq, carried) for a, (seq, carried) in batch),
                    ],
                ),
                self._timeout,
            )

    def _mark(self, addr: Address, seq: int) -> None:
        """A message with ``seq`` is committed for ``addr``: push it from the store."""
        conn = self._state.hub.get(addr)
        if conn is None:
            return
        if not conn.live:
            # The socket still drains its backlog: make the drain read again before going live.
            if seq > conn.pending_max:
                conn.pending_max = seq
            return
        if seq > conn.last_seq:
            self._want(addr)

    def _want(self, addr: Address) -> None:
        self._dirty.add(addr)
        if (self._pump_task is None or self._pump_task.done()) and not self._closing:
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        while self._dirty and not self._closing:
            batch = list(self._dirty)[:_PUMP_BATCH]
            self._dirty.difference_update(batch)
            await asyncio.gather(*(self._push(addr) for addr in batch))

    async def _push(self, addr: Address) -> None:
        hub = self._state.hub
        conn = hub.get(addr)
        if conn is None or not conn.live or conn.closing:
            return
        self._metrics.redis_push_reads += 1
        try:
            msgs = await self._state.store.fetch_mailbox(addr, conn.last_seq, _PAGE, _PAGE_BYTES)
        except RelayError as err:  # the next wake or the poll retries
            log.warning("push read failed user=%s: %s", addr.user, err.code)
            return
        if hub.get(addr) is not conn or not msgs:
            return
        hub.deliver([Delivery(addr, m) for m in msgs])
        if len(msgs) >= _PAGE:
            self._want(addr)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._config.redis_poll_seconds)
            self.push_all()

    def push_all(self) -> None:
        """Re-read every live local socket's mailbox (the safety poll; after a resync)."""
        for conn in self._state.hub.connections():
            if conn.live:
                self._want(conn.addr)

    # -- messages from other nodes -----------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            pubsub: PubSub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel, self._removed_channel)
                # Subscribed: from now on nothing is missed, so catch up on what may have been.
                await self._resync()
                self._subscribed = True
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._on_message(msg["channel"], msg["data"])
            except (*_REDIS_ERRORS, RelayError) as exc:
                if self._subscribed:
                    log.warning(
                        "relay node %s lost its subscription: %s", self.node_id, type(exc).__name__
                    )
            finally:
                self._subscribed = False
                with contextlib.suppress(*_REDIS_ERRORS, RuntimeError):
                    await pubsub.aclose()
            await asyncio.sleep(min(1.0, self._config.redis_heartbeat_seconds))

    async def _resync(self) -> None:
        """After (re)subscribing: messages published meanwhile may be lost. Forget cached auth
        keys, close sockets of removed devices, refresh presence and re-read every mailbox."""
        self._metrics.redis_resyncs += 1
        st = self._state
        st.keys.clear()
        for conn in list(st.hub.connections()):
            if await st.store.auth_key(conn.addr) is None:
                st.hub.kick(conn, CLOSE_DEVICE_REMOVED, "device removed")
        await asyncio.wait_for(self.redis.ping(), self._timeout)
        self._set_commands_ok(True)
        await self._refresh()
        self.push_all()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        hub = self._state.hub
        direct: list[tuple[Address, int, bytes]] = []
        expect: dict[Address, int] = {}
        for line in data.decode("ascii", "replace").split("\n"):
            parts = line.split(" ")
            try:
                kind = parts[0]
                if kind == "D" and len(parts) == 5:
                    # A carried message: push it now if it is exactly the socket's next seq
                    # (nothing can be missing before it), else read the store as for "W".
                    addr = Address(parts[3], int(parts[2]))
                    seq = int(parts[1])
                    conn = hub.get(addr)
                    if conn is None:
                        continue
                    if conn.live and seq == expect.get(addr, conn.last_seq + 1):
                        direct.append((addr, seq, base64.b64decode(parts[4], validate=True)))
                        expect[addr] = seq + 1
                    else:
                        self._mark(addr, seq)
                elif kind == "W" and len(parts) == 4:
                    self._mark(Address(parts[3], int(parts[2])), int(parts[1]))
                elif kind == "K" and len(parts) == 4:
                    conn = self._state.hub.get(Address(parts[3], int(parts[2])))
                    if conn is not None and conn.token == parts[1]:
                        log.info(
                            "closing replaced connection user=%s device=%d (newer elsewhere)",
                            conn.addr.user,
                            conn.addr.device,
                        )
                        self._state.hub.kick(conn, CLOSE_REPLACED, "replaced by a newer connection")
                elif kind == "R" and len(parts) == 3:
                    addr = Address(parts[2], int(parts[1]))
                    self._state.keys.pop(addr, None)
                    self._state.hub.kick_device(addr, CLOSE_DEVICE_REMOVED, "device removed")
            except (ValueError, binascii.Error):
                log.warning("ignored a malformed node message line (%d bytes)", len(line))
        if direct:
            self._metrics.redis_carried_pushes += len(direct)
            hub.deliver_encoded(direct)

    # -- device removal ------------------------------------------------------------------------

    async def publish_removed(self, addr: Address) -> None:
        """Tell every node that ``addr`` was removed (they drop its cached auth key and close
        its socket with 4003). Never raises: if Redis does not answer, the message is kept and
        sent by the heartbeat once Redis answers again."""
        self._removals.append(addr)
        try:
            await self._flush_removals()
        except _REDIS_ERRORS:
            self._set_commands_ok(False)

    async def _flush_removals(self) -> None:
        while self._removals:
            addr = self._removals[0]
            await asyncio.wait_for(
                self.redis.publish(self._removed_channel, f"R {addr.device} {addr.user}"),
                self._timeout,
            )
            if self._removals and self._removals[0] == addr:
                self._removals.pop(0)


def _wake_lines(addr: Address, seq: int, carried: list[tuple[int, bytes]] | None) -> str:
    """The wake-up lines for one recipient device: its carried messages, or a bare wake-up."""
    if not carried:
        return f"W {seq} {addr.device} {addr.user}"
    return "\n".join(
        f"D {s} {addr.device} {addr.user} {base64.b64encode(payload).decode('ascii')}"
        for s, payload in carried
    )
