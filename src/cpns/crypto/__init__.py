"""Thin, typed wrappers over pyca/cryptography and hashlib (DESIGN §4).

No protocol decisions live here: each function names its algorithm, its lengths and its
label, and the procedure modules decide what to feed it. Nothing here reads a clock or the
OS RNG: nonces and salts are arguments.
"""

from cpns.crypto.hashchain import build_chain, verify_chain_step
from cpns.crypto.hashing import KEY_LEN, hash_values, mac, verify_mac
from cpns.crypto.kdf import derive_key, password_key
from cpns.crypto.keywrap import NONCE_LEN, open_sealed, seal

__all__ = [
    "KEY_LEN",
    "NONCE_LEN",
    "build_chain",
    "derive_key",
    "hash_values",
    "mac",
    "open_sealed",
    "password_key",
    "seal",
    "verify_chain_step",
    "verify_mac",
]
