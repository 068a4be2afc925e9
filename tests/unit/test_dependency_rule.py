"""STYLE §1 dependency rule: the sans-I/O core imports no I/O, clock, OS randomness, threads
or shell package (docs/architecture.md, "The dependency rule").

Every module of cpns.protocol, cpns.messages and cpns.crypto, plus cpns.types, cpns.errors
and cpns.records, is parsed with ``ast`` (not imported), and every import is collected:
``import x``, ``from x import y`` (as ``x`` and ``x.y``), relative imports resolved against
the module's package, imports nested in functions, classes or ``if TYPE_CHECKING:``
blocks, and ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cpns

PACKAGE_ROOT = Path(cpns.__file__).resolve().parent

#: The core: packages walked recursively, and single modules.
CORE_PACKAGES = ("protocol", "messages", "crypto")
CORE_MODULES = ("types", "errors", "records")

#: Nothing under these names may be imported by the core (a name or any submodule of it).
FORBIDDEN = (
    "asyncio",
    "socket",
    "ssl",
    "sqlite3",
    "time",
    "os",
    "secrets",
    "random",
    "threading",
    "httpx",
    "h11",
    "uvicorn",
    "cpns.store",
    "cpns.server",
    "cpns.gateway",
    "cpns.device",
    "cpns.transport",
    "cpns.cli",
    "cpns.runtime",
    "cpns.metrics",
    "prometheus_client",
)


def module_name(path: Path) -> str:
    """Dotted module name of a file under src/cpns."""
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_files() -> list[Path]:
    files = [PACKAGE_ROOT / f"{name}.py" for name in CORE_MODULES]
    for package in CORE_PACKAGES:
        files.extend(sorted((PACKAGE_ROOT / package).rglob("*.py")))
    return files


def imported_names(source: str, *, module: str, is_package: bool = False) -> set[str]:
    """Every module name ``source`` imports, anywhere in the file."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            called = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if (
                called in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value)
    return names


def violations(names: set[str]) -> list[str]:
    """The imported names that fall under FORBIDDEN."""
    return sorted(
        name for name in names if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    )


def check_source(source: str, *, module: str = "cpns.protocol.example") -> list[str]:
    return violations(imported_names(source, module=module))


def test_the_core_is_where_it_is_expected() -> None:
    """The walk finds the core's modules (an empty walk would pass vacuously)."""
    names = {module_name(p) for p in core_files()}
    assert {
        "cpns.types",
        "cpns.errors",
        "cpns.records",
        "cpns.protocol._machine",
        "cpns.protocol.key_assignment",
        "cpns.protocol.user_key_assignment",
        "cpns.messages.codec",
        "cpns.crypto.keywrap",
    } <= names


@pytest.mark.parametrize("path", core_files(), ids=module_name)
def test_core_module_imports_no_io(path: Path) -> None:
    """STYLE §1: cpns.protocol, cpns.messages and cpns.crypto (and types, errors, records)
    never import asyncio, socket, ssl, sqlite3, time, os, secrets, random, threading, an HTTP
    library, or any shell package (store, server, gateway, device, transport, cli, runtime)."""
    module = module_name(path)
    names = imported_names(
        path.read_text(encoding="utf-8"), module=module, is_package=path.name == "__init__.py"
    )
    assert violations(names) == [], f"{module} imports {violations(names)}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("import socket", ["socket"], id="import"),
        pytest.param("import os.path", ["os.path"], id="submodule"),
        pytest.param("from os import urandom", ["os", "os.urandom"], id="from-import"),
        pytest.param("import asyncio as aio", ["asyncio"], id="aliased"),
        pytest.param(
            "def f():\n    import time\n    return time", ["time"], id="nested-in-function"
        ),
        pytest.param(
            "class C:\n    def m(self):\n        from threading import Lock",
            ["threading", "threading.Lock"],
            id="nested-in-method",
        ),
        pytest.param(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sqlite3",
            ["sqlite3"],
            id="type-checking-block",
        ),
        pytest.param("from cpns import store", ["cpns.store"], id="package-attribute"),
        pytest.param(
            "from cpns.store.base import ServerStore",
            ["cpns.store.base", "cpns.store.base.ServerStore"],
            id="store-base-too",
        ),
        pytest.param(
            "from ..runtime import SystemRandom",
            ["cpns.runtime", "cpns.runtime.SystemRandom"],
            id="relative-parent",
        ),
        pytest.param("from .. import transport", ["cpns.transport"], id="relative-package"),
        pytest.param(
            "import importlib\nimportlib.import_module('ssl')", ["ssl"], id="import-module-call"
        ),
        pytest.param("__import__('secrets')", ["secrets"], id="dunder-import"),
        pytest.param("import httpx, uvicorn", ["httpx", "uvicorn"], id="two-at-once"),
    ],
)
def test_the_checker_can_fail(source: str, expected: list[str]) -> None:
    """The rule is only worth something if the checker reports violations: synthetic
    sources importing forbidden modules in every way are all caught."""
    assert check_source(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "import hashlib, hmac, dataclasses",
        "from cryptography.hazmat.primitives.ciphers.aead import AESGCM",
        "from cpns.messages.model import Message",
        "from . import _machine",
        "import timeit",  # a prefix of a forbidden name is not that name
        "import osmosis",
        "from cpns.stores import x",
        "x = 'import socket'",
    ],
)
def test_the_checker_allows_the_rest(source: str) -> None:
    """The checker matches whole module names, so allowed modules are not flagged."""
    assert check_source(source) == []
