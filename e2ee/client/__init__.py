"""The client SDK: :class:`Client`, an async messenger client for one account.

Where each part lives (every module opens with its invariants):

* :mod:`e2ee.client.facade` -- :class:`Client`, the public API; it delegates.
* :mod:`e2ee.client.datadir` -- the data directory and its one-process lock.
* :mod:`e2ee.client.account` -- creating an account and registering it.
* :mod:`e2ee.client.context` -- the state the parts share; :class:`ClientOptions`.
* :mod:`e2ee.client.compose` -- rows for what we send or record.
* :mod:`e2ee.client.inbox` -- receiving: decrypt, apply, commit, acknowledge.
* :mod:`e2ee.client.outbox` -- sending: in order, once, held on a changed key.
* :mod:`e2ee.client.groups` -- group changes started here.
* :mod:`e2ee.client.chats` -- deleting a chat's local history.
* :mod:`e2ee.client.attachments` -- fetching attachments (file or memory).
* :mod:`e2ee.client.connection` -- the relay connection (one backoff) and timers.
* :mod:`e2ee.client.devices` -- linked devices: grants, ``client.devices``.
* :mod:`e2ee.client.provisioning` -- the new device's side of linking (:class:`PendingLink`).
* :mod:`e2ee.client.link` -- :class:`RelayLink` and the real :class:`TransportLink`.
* :mod:`e2ee.client.sealing` -- sealed sender; its settings, ``client.sealed``.
"""

from e2ee.client.context import ClientOptions
from e2ee.client.datadir import DB_FILE, LOCK_FILE
from e2ee.client.devices import DeviceRecord, Devices, LinkCode, LinkGrant, NewDeviceKeys
from e2ee.client.facade import Client
from e2ee.client.link import LinkFactory, RelayLink, TransportLink
from e2ee.client.provisioning import PendingLink
from e2ee.client.sealing import SealedSender

# The value types and helpers of the facade's API, re-exported so programs on the facade (the TUI
# and the CLI: an import-linter contract keeps them off e2ee.core/store/transport/history) name
# them from here: History (``Client.history``) and its rows, chat ids, the KDF limits of
# ``Client.create``, and the relay-URL checks ``Client.create`` applies.
from e2ee.history import NOTICE_TYPES as NOTICE_TYPES
from e2ee.history import ChatSummary as ChatSummary
from e2ee.history import GroupInfo as GroupInfo
from e2ee.history import History as History
from e2ee.history import StoredMessage as StoredMessage
from e2ee.history import direct_chat_id as direct_chat_id
from e2ee.history import group_chat_id as group_chat_id
from e2ee.store.sealing import KdfLimits as KdfLimits
from e2ee.transport.failover import MAX_RELAY_URLS as MAX_RELAY_URLS
from e2ee.transport.failover import check_relay_urls as check_relay_urls
from e2ee.transport.requests import origin_of as origin_of

__all__ = [
    "DB_FILE",
    "LOCK_FILE",
    "Client",
    "ClientOptions",
    "DeviceRecord",
    "Devices",
    "LinkCode",
    "LinkFactory",
    "LinkGrant",
    "NewDeviceKeys",
    "PendingLink",
    "RelayLink",
    "SealedSender",
    "TransportLink",
]
