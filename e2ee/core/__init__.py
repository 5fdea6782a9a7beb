"""Protocol core: python-axolotl + PyNaCl with no network, disk or UI.

Everything here takes bytes and typed values and returns bytes, typed results
and :class:`~e2ee.store.protocols.Changes` to commit; the store it is given is
the only state it touches.
"""

from e2ee.core.budget import MAX_SENDER_KEY_JUMP, MAX_SKIPPED_KEYS, DecryptLimits
from e2ee.core.engine import Ciphertext, Decrypted, KeyPolicy, ProtocolEngine
from e2ee.core.keys import KeyUpload, OneTimePreKey, PreKeyBundle, SignedPreKey
from e2ee.core.staging import MAX_SENDER_KEY_STATES

__all__ = [
    "MAX_SENDER_KEY_JUMP",
    "MAX_SENDER_KEY_STATES",
    "MAX_SKIPPED_KEYS",
    "Ciphertext",
    "DecryptLimits",
    "Decrypted",
    "KeyPolicy",
    "KeyUpload",
    "OneTimePreKey",
    "PreKeyBundle",
    "ProtocolEngine",
    "SignedPreKey",
]
