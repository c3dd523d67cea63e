"""Node and role keys, envelopes, the keystore and Shamir sharing.

Import from the submodules (``slurpfs.crypto.envelope``, ``.keys``, ``.keystore``,
``.shamir``); the most used names are re-exported here.
"""

from slurpfs.crypto.envelope import (
    Envelope,
    Header,
    KeySlot,
    Sealed,
    decrypt,
    open_envelope,
    seal,
    unwrap_data_key,
    verify,
    wrap_data_key,
)
from slurpfs.crypto.keys import (
    Keyring,
    NodeIdentity,
    RoleKeyPair,
    RolePublicKey,
    verify_signature,
)
from slurpfs.crypto.keystore import KdfParams, Keystore

__all__ = [
    "Envelope",
    "Header",
    "KdfParams",
    "KeySlot",
    "Keyring",
    "Keystore",
    "NodeIdentity",
    "RoleKeyPair",
    "RolePublicKey",
    "Sealed",
    "decrypt",
    "open_envelope",
    "seal",
    "unwrap_data_key",
    "verify",
    "verify_signature",
    "wrap_data_key",
]
