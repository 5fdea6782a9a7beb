"""A forwarder with the relay's frames and stack but none of its work (bench/peer_ejabberd.py
``--floor``).

Not a relay: no authentication, storage, checks, acks or limits. It answers ``POST
/v1/accounts`` with 201, takes any ``GET /v1/ws`` upgrade as the device its
``X-Blindpost-User`` header names (device 1), tells it ``{"type":"empty"}`` at once, and for
each SEND frame writes a DELIVER frame to the recipient's socket (when connected) and a
``send_result`` 200 to the sender. Ack frames are read and dropped. ``GET /metrics`` is empty.

It reads and writes frames the relay's own lean way, so it is the least any relay on this stack
pays per message: aiohttp on uvloop (blindpost_wire.loop), frames taken in the parser's
callback (relay.ws_frames, as with ``ws_direct_frames``), frames written straight to the
transport (as relay.hub does). Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from aiohttp import WSMsgType, web

from blindpost_wire.frames import decode_send_frame, encode_deliver
from blindpost_wire.loop import run
from relay.hub import OPCODE_BINARY, OPCODE_TEXT, frame_bytes
from relay.store.base import Address
from relay.wire import b64e
from relay.ws_frames import FastFramesResponse


class _Socket:
    __slots__ = ("seq", "transport", "user")

    def __init__(self, user: str, transport: asyncio.Transport) -> None:
        self.user = user
        self.transport = transport
        self.seq = 0


def build_app() -> web.Application:
    sockets: dict[str, _Socket] = {}

    def on_frame(sock: _Socket, msg: Any) -> Any:
        if msg.type == WSMsgType.TEXT:
            return None  # an ack: dropped
        if msg.type != WSMsgType.BINARY:
            return msg
        mid, _after, recipients, body = decode_send_frame(msg.data, address=Address)
        now_ms = int(time.time() * 1000)
        for r in recipients:
            peer = sockets.get(r.user)
            if peer is not None and not peer.transport.is_closing():
                peer.seq += 1
                payload = encode_deliver(peer.seq, mid, sock.user, 1, now_ms, body)
                peer.transport.write(frame_bytes(OPCODE_BINARY, payload))
        result = (
            f'{{"type":"send_result","id":"{b64e(mid)}","status":200,'
            f'"recipients":{len(recipients)},"stored_at":{now_ms}}}'
        )
        sock.transport.write(frame_bytes(OPCODE_TEXT, result.encode()))
        return None

    async def accounts(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({}, status=201)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        user = request.headers.get("X-Blindpost-User", "")
        ws = FastFramesResponse(autoping=True, max_msg_size=1 << 20)
        await ws.prepare(request)
        transport = request.transport
        frames = ws.frames
        if transport is None or frames is None:
            raise RuntimeError("this aiohttp has no direct frame path")
        sock = _Socket(user, transport)
        sockets[user] = sock
        frames.owner = sock
        frames.handle = on_frame
        await ws.send_str('{"type":"empty"}')
        try:
            while True:
                frames.resume()
                msg = await ws.receive()
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    on_frame(sock, msg)
        finally:
            frames.close()
            if sockets.get(user) is sock:
                del sockets[user]
        return ws

    app = web.Application()
    app.router.add_post("/v1/accounts", accounts)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/ws", ws_handler)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()

    async def serve() -> None:
        runner = web.AppRunner(build_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        await asyncio.Event().wait()

    run("auto", serve())


if __name__ == "__main__":
    main()
