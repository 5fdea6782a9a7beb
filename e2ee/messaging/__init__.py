"""The messenger's rules as pure functions over a read view of history.

In the spirit of h11: no asyncio, no SQLite, no network (an import-linter
contract in pyproject.toml says so). Each rule takes its input, a
:class:`~e2ee.messaging.view.HistoryView`, the time and new ids, and returns an
:class:`~e2ee.messaging.outcome.Outcome` (rows to commit, events, follow-ups).
The client (:mod:`e2ee.client`) reads, calls a rule, commits, emits.

Where each rule lives:

* :mod:`e2ee.messaging.compose` -- what we send: outbox and history rows.
* :mod:`e2ee.messaging.inbound` -- what an arriving payload does, a table of
  one function per payload type (``HANDLERS``).
* :mod:`e2ee.messaging.groups` -- membership, admins, revisions, key rotation.
* :mod:`e2ee.messaging.accounting` -- gaps, undecryptable messages, repairs.
* :mod:`e2ee.messaging.chats` -- chat rows and notices.
* :mod:`e2ee.messaging.keys` -- the names of the counters.
* :mod:`e2ee.messaging.rows` -- table shapes and the message type.
* :mod:`e2ee.messaging.view` / :mod:`e2ee.messaging.outcome` -- input and output.
* :mod:`e2ee.messaging.memory` -- the in-memory history (the view's twin).
"""

# Nothing is imported here: e2ee.events needs e2ee.messaging.rows, and the
# rules need e2ee.events. Import the module that owns the rule.
__all__: list[str] = []
