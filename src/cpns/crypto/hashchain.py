"""The EUKey hash chain of 003 §7.4.2.1.1.2 step 4.

``EUKey_n = H(SeedPNE)``, ``EUKey_{i-1} = H(EUKey_i)``. Keys are used in the order
1, 2, ..., n, so a receiver holding ``EUKey_i`` checks a presented ``EUKey_{i+1}`` with a
single hash: ``H(EUKey_{i+1}) == EUKey_i`` (DESIGN §4).
"""

from __future__ import annotations

import hmac

from cpns.crypto.hashing import KEY_LEN, hash_values
from cpns.errors import AuthenticationFailed, LocalProtocolError

__all__ = ["CHAIN_LABEL", "MAX_CHAIN_LEN", "build_chain", "chain_step", "verify_chain_step"]

#: Label of every chain hash (versioned, DESIGN §4).
CHAIN_LABEL = "cpns/v1/eukey-chain"
#: Upper bound on n, so that a request cannot make the server hash without end.
MAX_CHAIN_LEN = 1024


def chain_step(key: bytes) -> bytes:
    """One step down the chain: ``H(EUKey_i)``, which is ``EUKey_{i-1}``."""
    return hash_values(CHAIN_LABEL, key)


def build_chain(seed: bytes, n: int) -> list[bytes]:
    """Return ``[EUKey_1, ..., EUKey_n]`` (list index 0 holds EUKey_1)."""
    if not 1 <= n <= MAX_CHAIN_LEN:
        raise LocalProtocolError(f"chain length must be 1..{MAX_CHAIN_LEN}")
    if len(seed) != KEY_LEN:
        raise LocalProtocolError("SeedPNE is 32 bytes")
    keys = [chain_step(seed)]  # EUKey_n
    for _ in range(n - 1):
        keys.append(chain_step(keys[-1]))
    keys.reverse()
    return keys


def verify_chain_step(previous: bytes, candidate: bytes, *, max_steps: int = 1) -> int:
    """Check that ``candidate`` lies 1..``max_steps`` positions after ``previous``.

    Returns how many steps ahead it is. Raises :class:`AuthenticationFailed` otherwise.
    ``max_steps`` is the bounded look-ahead window of DESIGN §5.
    """
    value = candidate
    found = 0
    for step in range(1, max_steps + 1):
        value = chain_step(value)
        # Keep looping after a match so the time taken does not tell the distance.
        if hmac.compare_digest(value, previous) and not found:
            found = step
    if not found:
        raise AuthenticationFailed("hash-chain value does not follow the previous key")
    return found
