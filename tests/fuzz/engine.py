"""A small coverage-free mutation fuzzer (issue 5 item 17).

Inputs come from a seed corpus of valid encodings, mutated three ways:

* bytes: flip bits, set bytes to boundary values, insert, delete, duplicate or swap
  ranges, splice two corpus entries, truncate, append junk;
* CBOR structure (targets whose inputs are CBOR): decode a corpus entry with plain cbor2,
  change the tree (drop or add a map key, swap a value for another CBOR type, huge and
  negative integers, bignums, floats, tags, nested arrays, long strings, wrong-length
  bytes) and re-encode it canonically or not, with indefinite lengths or duplicate keys;
* text (the other targets): splice in words from the target's dictionary.

Inputs a decoder accepts join the corpus (a cheap stand-in for coverage feedback), up to
a bound. Runs are deterministic for a given ``seed``. The engine never stops on a
finding: it records the input and goes on, so one run reports every kind of failure.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from tests.fuzz.targets import PropertyViolation, Target

__all__ = ["Finding", "RunStats", "fuzz", "mutate"]

_MAX_CORPUS = 2000
_MAX_INPUT = 70_000
_INTERESTING_INTS = (
    0,
    1,
    -1,
    23,
    24,
    255,
    256,
    65535,
    65536,
    2**31 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**64),
    10**3000,
    -(10**3000),
)
_INTERESTING_BYTES = (0x00, 0x01, 0x17, 0x18, 0x1F, 0x3F, 0x5F, 0x7F, 0x80, 0x9F, 0xBF, 0xFF)


@dataclass
class Finding:
    """An input that made the target raise something other than its own error."""

    target: str
    data: bytes
    error: str
    trace: str


@dataclass
class RunStats:
    """What one run of one target did."""

    target: str
    inputs: int = 0
    accepted: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Inputs per second."""
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


def _mutate_bytes(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(10)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice(_INTERESTING_BYTES)
        elif op == 2:
            i = rng.randint(0, n)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and n:
            i = rng.randrange(n)
            del buf[i : i + rng.randint(1, 16)]
        elif op == 4 and n:
            i = rng.randrange(n)
            j = rng.randint(i, min(n, i + 64))
            k = rng.randint(0, n)
            buf[k:k] = buf[i:j]
        elif op == 5 and n:
            del buf[rng.randrange(n) :]
        elif op == 6:
            other = rng.choice(corpus)
            cut = rng.randint(0, len(other))
            buf = buf[: rng.randint(0, n)] + bytearray(other[cut:])
        elif op == 7:
            buf += rng.randbytes(rng.randint(1, 4))
        elif op == 8 and n >= 2:
            i, j = rng.randrange(n), rng.randrange(n)
            buf[i], buf[j] = buf[j], buf[i]
        elif op == 9 and n:
            i = rng.randrange(n)
            buf[i] = (buf[i] + rng.choice((1, -1, 16, -16))) & 0xFF
    return bytes(buf[:_MAX_INPUT])


def _mutate_text(rng: random.Random, data: bytes, words: tuple[bytes, ...]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randint(0, len(buf))
        if rng.random() < 0.3 and buf:
            del buf[i : i + rng.randint(1, 8)]
        else:
            word = rng.choice(words)
            buf[i:i] = word * (1 if rng.random() < 0.9 else rng.randint(2, 600))
    return bytes(buf[:_MAX_INPUT])


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 3 else 9)
    if choice == 0:
        return rng.choice(_INTERESTING_INTS)
    if choice == 1:
        return rng.randbytes(rng.choice((0, 1, 15, 16, 17, 31, 32, 33, 64, 300)))
    if choice == 2:
        return rng.choice(("", "a", "-x", "A" * 129, "\u00e9", "gw alice", "a:b", "\x00"))
    if choice == 3:
        return rng.choice((True, False, None))
    if choice == 4:
        return rng.choice((0.0, 1.5, float("nan"), float("inf")))
    if choice == 5:
        return cbor2.CBORTag(rng.choice((0, 1, 2, 3, 24, 55799, 9999)), rng.randbytes(2))
    if choice == 6:
        return cbor2.undefined
    if choice == 7:
        return rng.randint(-(2**70), 2**70)
    if choice == 8:
        return "x" * rng.choice((128, 1000))
    if choice == 9:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if choice == 10:
        return {rng.randint(-2, 8): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [[[[[[1]]]]]]


def _mutate_tree(rng: random.Random, value: Any, depth: int = 0) -> Any:
    if isinstance(value, dict) and value:
        out = dict(value)
        key = rng.choice(list(out))
        op = rng.randrange(5)
        if op == 0:
            del out[key]
        elif op == 1:
            out[rng.choice((7, 9, -1, "1", 6, 5, 0))] = _random_value(rng)
        elif op == 2:
            out[key] = _random_value(rng)
        else:
            out[key] = _mutate_tree(rng, out[key], depth + 1)
        return out
    if isinstance(value, list) and value:
        out_list = list(value)
        i = rng.randrange(len(out_list))
        op = rng.randrange(4)
        if op == 0:
            del out_list[i]
        elif op == 1:
            out_list.insert(i, _random_value(rng))
        elif op == 2:
            out_list[i] = _mutate_tree(rng, out_list[i], depth + 1)
        else:
            out_list *= rng.choice((2, 100))
        return out_list
    return _random_value(rng)


def _dumps_variant(rng: random.Random, tree: Any) -> bytes:
    mode = rng.randrange(6)
    try:
        if mode == 0:
            return bytes(cbor2.dumps(tree))  # insertion order, not sorted
        encoded = bytes(cbor2.dumps(tree, canonical=True))
    except Exception:
        return b""
    if mode == 1 and encoded:
        # Non-shortest head: re-spell the first item's length with one more byte.
        head = encoded[0]
        major, info = head >> 5, head & 0x1F
        if info < 24:
            return bytes([(major << 5) | 24, info]) + encoded[1:]
    if mode == 2 and encoded and encoded[0] >> 5 == 5:
        # Indefinite-length map with the same items.
        return bytes([0xBF]) + encoded[1:] + b"\xff"
    if mode == 3 and encoded and 0xA1 <= encoded[0] <= 0xB7:
        # One more pair than the map holds, repeating its first key: a duplicate key.
        count = encoded[0] & 0x1F
        return bytes([0xA0 | (count + 1)]) + encoded[1:] + encoded[1:]
    return encoded


def mutate(rng: random.Random, target: Target, corpus: list[bytes]) -> bytes:
    """One new input for ``target`` from ``corpus``."""
    parent = rng.choice(corpus)
    roll = rng.random()
    if target.cbor and roll < 0.5:
        try:
            tree = cbor2.loads(parent)
        except Exception:
            return _mutate_bytes(rng, parent, corpus)
        for _ in range(rng.randint(1, 2)):
            tree = _mutate_tree(rng, tree)
        return _dumps_variant(rng, tree)[:_MAX_INPUT]
    if target.dictionary and roll < 0.6:
        return _mutate_text(rng, parent, target.dictionary)
    return _mutate_bytes(rng, parent, corpus)


def fuzz(
    target: Target,
    *,
    runs: int,
    seed: int = 0,
    progress: Callable[[RunStats], None] | None = None,
    max_findings: int = 20,
) -> RunStats:
    """Run ``runs`` inputs through ``target`` (the seeds first); return the statistics."""
    rng = random.Random(seed)  # determinism, not secrecy
    corpus = list(target.seeds())
    n_seeds = len(corpus)
    stats = RunStats(target.name)
    start = time.perf_counter()
    for n in range(runs):
        data = corpus[n] if n < n_seeds else mutate(rng, target, corpus)
        try:
            accepted = target.run(data)
        except target.allowed as exc:  # pragma: no cover - targets catch their own error
            raise AssertionError(f"{target.name} let its own error out: {exc!r}") from None
        except (Exception, RecursionError) as exc:
            if len(stats.findings) < max_findings:
                kind = "property" if isinstance(exc, PropertyViolation) else "crash"
                stats.findings.append(
                    Finding(
                        target.name,
                        data,
                        f"{kind}: {type(exc).__name__}: {str(exc)[:200]}",
                        traceback.format_exc(limit=6)[-2000:],
                    )
                )
            accepted = False
        stats.inputs += 1
        if accepted:
            stats.accepted += 1
            if len(corpus) < _MAX_CORPUS and data not in corpus:
                corpus.append(data)
        if progress is not None and stats.inputs % 100_000 == 0:
            stats.seconds = time.perf_counter() - start
            progress(stats)
    stats.seconds = time.perf_counter() - start
    return stats
