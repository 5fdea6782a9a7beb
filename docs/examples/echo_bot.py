"""An echo bot on `blindpost daemon`: every text message comes back as a reply.

Run it on an account made with ``blindpost --data DIR init NAME --relay URL``:

    python docs/examples/echo_bot.py --data DIR

It starts ``blindpost --data DIR daemon`` and talks JSON-RPC 2.0 with it over the
daemon's stdin/stdout, one JSON object per line (docs/cli.md, "The daemon"). Events
arrive as ``receive`` notifications whose params are the records ``receive --json``
prints. Only the standard library is needed. Stop it with Ctrl-C (the daemon stops
cleanly when its stdin closes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description="echo every text message back")
    parser.add_argument("--data", required=True, help="the bot account's data directory")
    parser.add_argument("--blindpost", default=shutil.which("blindpost") or "blindpost")
    parser.add_argument("--max-messages", type=int, default=0, help="stop after N (0: never)")
    args = parser.parse_args()

    daemon = subprocess.Popen(  # noqa: S603  (the blindpost command, not input)
        [args.blindpost, "--data", args.data, "daemon"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon.stdin is not None and daemon.stdout is not None
    ids = itertools.count(1)
    replies: dict[int, str] = {}  # request id of a send -> who it answers

    def call(method: str, params: dict[str, Any]) -> int:
        request_id = next(ids)
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        daemon.stdin.write(json.dumps(request) + "\n")
        daemon.stdin.flush()
        return request_id

    echoed = 0
    try:
        for line in daemon.stdout:
            message = json.loads(line)
            if message.get("method") == "receive":
                event = message["params"]
                if event["type"] != "message" or event["outgoing"] or event["kind"] != "text":
                    continue
                # Answer in the same chat: the group, or the sender.
                chat = {"group": event["group"]} if event["group"] else {"to": event["sender"]}
                sent = call("send", chat | {"text": event["text"], "reply_to": event["id"]})
                replies[sent] = event["sender"]
                read = {"group": event["group"]} if event["group"] else {"user": event["sender"]}
                call("read", read)
            elif "error" in message:
                error = message["error"]
                print(f"error {error['code']}: {error['message']}", file=sys.stderr, flush=True)
                replies.pop(message["id"], None)
            elif message.get("id") in replies:
                who = replies.pop(message["id"])
                print(f"echoed to {who}: {message['result']['id']}", flush=True)
                echoed += 1
                if echoed == args.max_messages:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        daemon.stdin.close()  # EOF: the daemon finishes what runs and exits
        daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
