"""Generate tests/vectors/crypto_v1.json: known-answer vectors of cpns.crypto (self-made).

Run from the repository root::

    PYTHONPATH=src python tests/vectors/make_vectors.py

The inputs below are fixed; the outputs are whatever the code computes today. The file is
committed, and ``tests/unit/crypto`` checks every vector twice: against the code (so a
change of output is noticed) and against an independent computation with ``hashlib``,
``hmac`` and the raw AES-GCM primitive (so a change of encoding cannot go unnoticed, and
so the vector is known to follow docs/crypto.md). README.md beside this file says where
each vector comes from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cpns.crypto.hashchain import CHAIN_LABEL, build_chain
from cpns.crypto.hashing import encode_parts, hash_values, mac
from cpns.crypto.kdf import SCRYPT_N, SCRYPT_P, SCRYPT_R, derive_key, password_key, password_salt
from cpns.crypto.keywrap import seal
from cpns.protocol import tk_auth
from cpns.protocol.key_assignment import auth_data, seed_pne

OUT = Path(__file__).with_name("crypto_v1.json")

type Part = bytes | str | int

LABEL = "cpns/v1/test-vector"
#: One value of each kind, including the empty value, a non-ASCII string and the int bounds.
PARTS: list[Part] = [b"\x00\x01\x02", "h\u00e9llo", 0, 2**64 - 1, b""]
#: "correct horse battery" in full-width letters and ideographic spaces (NFKC folds them).
FULL_WIDTH = "".join(
    "\u3000" if c == " " else chr(ord(c) + 0xFEE0) for c in "correct horse battery"
)


def part_json(value: Part) -> dict[str, Any]:
    """A part with its type made explicit (JSON cannot tell bytes from str)."""
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, str):
        return {"str": value}
    return {"int": value}


def build() -> dict[str, Any]:
    """Every vector, as the committed JSON holds it."""
    mac_key = bytes([0x0B]) * 32
    kdf_secret = bytes(range(1, 33))
    chain_seed = bytes(range(32))
    seal_secret = bytes([0x5E]) * 32
    seal_nonce = bytes(range(12))
    pw_key = bytes.fromhex("a1" * 32)
    return {
        "version": 1,
        "generator": "tests/vectors/make_vectors.py",
        "encode_parts": [
            {
                "label": LABEL,
                "parts": [part_json(p) for p in PARTS],
                "encoding": encode_parts(LABEL, PARTS).hex(),
            },
            {"label": LABEL, "parts": [], "encoding": encode_parts(LABEL, []).hex()},
        ],
        "hash": [
            {
                "label": LABEL,
                "parts": [part_json(p) for p in PARTS],
                "digest": hash_values(LABEL, *PARTS).hex(),
            },
            {"label": LABEL, "parts": [], "digest": hash_values(LABEL).hex()},
        ],
        "mac": [
            {
                "key": mac_key.hex(),
                "label": LABEL,
                "parts": [part_json(p) for p in PARTS],
                "tag": mac(mac_key, LABEL, *PARTS).hex(),
            }
        ],
        "derive_key": [
            {
                "secret": kdf_secret.hex(),
                "salt": "",
                "label": "cpns/v1/test-kdf",
                "context": [],
                "length": 32,
                "okm": derive_key(kdf_secret, salt=b"", label="cpns/v1/test-kdf").hex(),
            },
            {
                "secret": kdf_secret.hex(),
                "salt": (b"\x11" * 32 + b"\x22" * 32).hex(),
                "label": "cpns/v1/test-kdf",
                "context": [part_json(p) for p in ("gw-alice", "alice", b"\x33" * 16)],
                "length": 42,
                "okm": derive_key(
                    kdf_secret,
                    salt=b"\x11" * 32 + b"\x22" * 32,
                    label="cpns/v1/test-kdf",
                    context=("gw-alice", "alice", b"\x33" * 16),
                    length=42,
                ).hex(),
            },
        ],
        "password_key": [
            {
                "password": password,
                "realm": "cpns",
                "user_id": "alice",
                "scrypt": {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "dklen": 32},
                "salt": password_salt("cpns", "alice").hex(),
                "key": password_key(password, realm="cpns", user_id="alice").hex(),
            }
            # The second is the first in full-width forms: NFKC makes the keys equal.
            for password in ("correct horse battery", FULL_WIDTH)
        ],
        "chain": [
            {
                "label": CHAIN_LABEL,
                "seed": chain_seed.hex(),
                "n": 4,
                # list index 0 holds EUKey_1
                "eukeys": [k.hex() for k in build_chain(chain_seed, 4)],
            }
        ],
        "seal": [
            {
                "secret": seal_secret.hex(),
                "purpose": "test/purpose",
                "context": [part_json(p) for p in ("cpns-server", "gw-alice", 7)],
                "nonce": seal_nonce.hex(),
                "plaintext": bytes(range(32, 64)).hex(),
                "blob": seal(
                    seal_secret,
                    bytes(range(32, 64)),
                    purpose="test/purpose",
                    context=("cpns-server", "gw-alice", 7),
                    nonce=seal_nonce,
                ).hex(),
            }
        ],
        "auth_data_003": [
            {
                "password_key": pw_key.hex(),
                "rand_pngw": (b"\x42" * 32).hex(),
                "time": 1_700_000_000,
                "user_id": "alice",
                "pne_id": "pne-1",
                "gateway_id": "gw-alice",
                "auth_data": auth_data(
                    pw_key,
                    rand_pngw=b"\x42" * 32,
                    time=1_700_000_000,
                    user_id="alice",
                    pne_id="pne-1",
                    gateway_id="gw-alice",
                ).hex(),
            }
        ],
        "seed_pne": [
            {
                "rand_svr": (b"\x01" * 32).hex(),
                "rand_pngw": (b"\x02" * 32).hex(),
                "seed": seed_pne(b"\x01" * 32, b"\x02" * 32).hex(),
            }
        ],
        "tk_000": tk_vectors(),
    }


def tk_vectors() -> dict[str, Any]:
    """The TK flow of 000 §7.5 as docs/procedures/tk-authentication.md derives it.

    TK_0 = 00..1f ratcheted to step 3, EUKey_2 of a 4-key chain proven, EUKey_3 delivered.
    """
    tk = bytes(range(32))
    eukeys = build_chain(bytes([0x44]) * 32, 4)
    run = tk_auth.TKRun(
        pn_id="pn-home",
        gw_id="gw-alice",
        server_id="cpns-server",
        pne_id="pne-lamp",
        est_id=bytes([0x0E]) * 16,
        rand_pne=bytes([0x11]) * 32,
        rand_server=bytes([0x22]) * 32,
    )
    step, index, nonce = 3, 2, bytes(range(100, 112))
    tk_t = tk_auth.ratchet(tk, step)
    sk = tk_auth.tk_session_key(eukeys[index - 1], tk_t, run, step, index)
    return {
        "tk": tk.hex(),
        "eukeys": [k.hex() for k in eukeys],
        "run": {
            "pn_id": run.pn_id,
            "gw_id": run.gw_id,
            "server_id": run.server_id,
            "pne_id": run.pne_id,
            "est_id": run.est_id.hex(),
            "rand_pne": run.rand_pne.hex(),
            "rand_server": run.rand_server.hex(),
        },
        "tk_step": step,
        "key_index": index,
        "nonce": nonce.hex(),
        "tk_t": tk_t.hex(),
        "tk_next": tk_auth.ratchet(tk_t).hex(),
        "next_index": tk_auth.next_index_of(index, len(eukeys)),
        "an": tk_auth.compute_an(
            tk_t, run, step, index, tk_auth.next_index_of(index, len(eukeys))
        ).hex(),
        "sealed_next": tk_auth.seal_next_eukey(
            tk_t, eukeys[index], run, step, index + 1, nonce=nonce
        ).hex(),
        "sealed_current": tk_auth.seal_current_eukey(
            tk_t, eukeys[index - 1], run, step, index, nonce=nonce
        ).hex(),
        "sk": sk.hex(),
        "confirm": tk_auth.compute_confirm(sk, run, step, index).hex(),
    }


def render() -> str:
    """The file's exact text."""
    return json.dumps(build(), indent=2, ensure_ascii=True) + "\n"


def main() -> int:
    """Write the file; with ``--check``, only compare and exit 1 on a difference."""
    text = render()
    if "--check" in sys.argv[1:]:
        return 0 if OUT.read_text(encoding="ascii") == text else 1
    OUT.write_text(text, encoding="ascii")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
