"""A CPNS deployment on loopback: real server, gateway and device processes.

``cpns demo``, the integration tests and the benchmark all need the same thing: each
party as its own ``cpns`` process with its own data directory, talking over real
sockets (HTTPS to the server, TCP frames on the PAN side). :class:`LocalDeployment`
drives exactly the commands an operator would type, so whatever it does, a person can do
by hand from the README.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpns.errors import TransportError
from cpns.protocol.key_assignment import claim_code
from cpns.store.masterkey import write_private_file

__all__ = ["CommandResult", "LocalDeployment"]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What one ``cpns`` command did."""

    #: The arguments after ``cpns``.
    args: tuple[str, ...]
    #: Exit code.
    returncode: int
    #: Standard output.
    stdout: str
    #: Standard error.
    stderr: str


#: A well-formed claim code that proves nothing (for PNEs with no imported TK here).
_NO_CODE = "AAAA-AAAA-AAAA-AAAA"


@dataclass
class _Daemon:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class LocalDeployment:
    """Data directories under ``base`` and the processes started from them."""

    #: Where every party's data directory and log files go.
    base: Path
    #: Extra environment for every process.
    env: dict[str, str] = field(default_factory=dict)
    #: The server's database when :meth:`init_server` is given none: a PostgreSQL URL, or
    #: None for the default SQLite file.
    database: str | None = None
    _daemons: dict[str, _Daemon] = field(default_factory=dict)
    #: The port the server bound first; a restarted server binds it again, because the
    #: gateways enrolled against that URL.
    _server_port: int | None = None
    #: The label claim code of every PNE whose TK was imported here (D-003-10).
    claim_codes: dict[str, str] = field(default_factory=dict)

    @property
    def server_dir(self) -> Path:
        """The server's data directory."""
        return self.base / "server"

    def gateway_dir(self, name: str = "gw") -> Path:
        """A gateway's data directory."""
        return self.base / name

    def device_dir(self, name: str) -> Path:
        """A device's data directory."""
        return self.base / name

    @property
    def ca_file(self) -> Path:
        """The server certificate the gateways pin."""
        return self.server_dir / "tls" / "server-cert.pem"

    def prepare_base(self) -> None:
        """Create ``base`` (and parents) and make it 0700: it holds every party's secrets
        (master key, key stores, the TK CSV) and their logs."""
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.base, 0o700)

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def cpns(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0, check: bool = True
    ) -> CommandResult:
        """Run one ``cpns`` command to completion."""
        proc = subprocess.run(
            [sys.executable, "-m", "cpns.cli.main", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._environ(),
            check=False,
        )
        result = CommandResult(tuple(args), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"cpns {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return result

    def start(
        self,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        fd_limit: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running ``cpns`` command, logging to ``<base>/<name>.log``.

        ``env`` adds to the deployment's environment for this process only; ``fd_limit``
        lowers its open-file limit (RLIMIT_NOFILE), as a small host or container would.
        """
        preexec = None
        if fd_limit is not None:
            limit = fd_limit

            def preexec() -> None:
                import resource

                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

        if name in self._daemons and self._daemons[name].process.poll() is None:
            raise RuntimeError(f"{name} is already running")
        log_path = self.base / f"{name}.log"
        log = log_path.open("ab")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "cpns.cli.main", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self._environ(), **(env or {})},
                preexec_fn=preexec,
            )
        finally:
            log.close()
        self._daemons[name] = _Daemon(name, process, log_path)
        return process

    def wait_for_file(self, path: Path, *, name: str, timeout: float = 30.0) -> str:
        """Wait until a daemon writes ``path`` (its port file); return the content."""
        deadline = time.monotonic() + timeout
        daemon = self._daemons.get(name)
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return path.read_text().strip()
            if daemon is not None and daemon.process.poll() is not None:
                raise TransportError(
                    f"{name} exited with {daemon.process.returncode}:\n" + self.log(name)
                )
            time.sleep(0.05)
        raise TransportError(
            f"{name} did not write {path.name} within {timeout:.0f}s:\n" + self.log(name)
        )

    def log(self, name: str) -> str:
        """The log of a daemon (empty if it never started)."""
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, *, timeout: float = 15.0, kill: bool = False) -> int | None:
        """Stop a daemon with SIGTERM (SIGKILL if ``kill`` or if it does not stop)."""
        daemon = self._daemons.pop(name, None)
        if daemon is None:
            return None
        proc = daemon.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        return proc.returncode

    def stop_all(self) -> None:
        """Stop every daemon still running, newest first: devices and gateways close their
        connections before the server they talk to stops."""
        for name in reversed(list(self._daemons)):
            self.stop(name)

    # -- the parties -----------------------------------------------------------------------

    def init_server(
        self,
        *,
        users: Sequence[tuple[str, str]] = (),
        tk_records: Sequence[tuple[str, bytes]] = (),
        digest: Sequence[str] = ("SHA-256",),
        database: str | None = None,
    ) -> None:
        """``cpns server init`` on port 0 (``--database``: a PostgreSQL URL instead of the
        default SQLite file; by default :attr:`database`), then add users and import a TK CSV."""
        database = database if database is not None else self.database
        self.prepare_base()
        args = ["server", "init", "--data-dir", str(self.server_dir), "--port", "0"]
        for algorithm in digest:
            args += ["--digest", algorithm]
        if database is not None:
            args += ["--database", database]
        self.cpns(*args)
        for user_id, password in users:
            self.cpns(
                "admin",
                "user",
                "add",
                user_id,
                "--data-dir",
                str(self.server_dir),
                "--password-stdin",
                stdin=password + "\n",
            )
        for entity_id, tk in tk_records:
            self.claim_codes[entity_id] = claim_code(tk, entity_id)
        if tk_records:
            csv_path = self.base / "manufacturer-tk.csv"
            lines = ["entity_id,tk", *(f"{e},{tk.hex()}" for e, tk in tk_records)]
            # The TKs are secrets: the file is 0600 from its first byte.
            write_private_file(csv_path, ("\n".join(lines) + "\n").encode(), overwrite=True)
            self.cpns(
                "admin",
                "tk",
                "import",
                str(csv_path),
                "--data-dir",
                str(self.server_dir),
                "--quiet",
            )

    def start_server(self) -> str:
        """Start ``cpns server run``; return its base URL (the same one on a restart)."""
        port_file = self.server_dir / "server.port"
        port_file.unlink(missing_ok=True)
        env = {} if self._server_port is None else {"CPNS_SERVER_PORT": str(self._server_port)}
        self.start("server", "server", "run", "--data-dir", str(self.server_dir), env=env)
        self._server_port = int(self.wait_for_file(port_file, name="server"))
        return f"https://localhost:{self._server_port}"

    def enroll_gateway(
        self,
        *,
        entity_id: str,
        user_id: str,
        password: str,
        server_url: str,
        name: str = "gw",
        check: bool = True,
    ) -> CommandResult:
        """``cpns gateway enroll``: the PN GW gets its own EUKey (004 §5.x.1)."""
        return self.cpns(
            "gateway",
            "enroll",
            "--data-dir",
            str(self.gateway_dir(name)),
            "--entity-id",
            entity_id,
            "--server",
            server_url,
            "--ca",
            str(self.ca_file),
            # A free port picked at the first start and kept across restarts: several
            # deployments (tests running side by side) never fight over the default port.
            "--pan-port",
            "0",
            "--user",
            user_id,
            "--password-stdin",
            stdin=password + "\n",
            check=check,
        )

    def start_gateway(
        self, name: str = "gw", *, env: dict[str, str] | None = None, fd_limit: int | None = None
    ) -> int:
        """Start ``cpns gateway run``; return its PAN port (``env``, ``fd_limit``: as for
        :meth:`start`)."""
        port_file = self.gateway_dir(name) / "gateway.port"
        port_file.unlink(missing_ok=True)
        self.start(
            name,
            "gateway",
            "run",
            "--data-dir",
            str(self.gateway_dir(name)),
            env=env,
            fd_limit=fd_limit,
        )
        return int(self.wait_for_file(port_file, name=name))

    def assign(
        self,
        *,
        pne_id: str,
        user_id: str,
        password: str,
        name: str = "gw",
        wait: float = 0.0,
        check: bool = False,
        claim_code: str | None = None,
    ) -> CommandResult:
        """``cpns gateway assign``: EUKey assignment for a PNE without UI (003).

        ``claim_code`` defaults to the label code of the PNE's imported TK, given on
        standard input after the password."""
        code = claim_code if claim_code is not None else self.claim_codes.get(pne_id, _NO_CODE)
        return self.cpns(
            "gateway",
            "assign",
            "--data-dir",
            str(self.gateway_dir(name)),
            "--pne",
            pne_id,
            "--user",
            user_id,
            "--password-stdin",
            "--wait",
            str(wait),
            stdin=password + "\n" + code + "\n",
            check=check,
            timeout=60.0 + wait,
        )

    def init_device(self, name: str, *, entity_id: str, tk: bytes) -> CommandResult:
        """``cpns device init`` with the factory TK, given on standard input (never on the
        command line, where the process list would show it)."""
        return self.cpns(
            "device",
            "init",
            "--data-dir",
            str(self.device_dir(name)),
            "--entity-id",
            entity_id,
            "--tk-stdin",
            stdin=tk.hex() + "\n",
        )

    def enroll_device(
        self,
        name: str,
        *,
        user_id: str,
        password: str,
        pan_port: int,
        entity_id: str | None = None,
        check: bool = False,
        extra: Sequence[str] = (),
    ) -> CommandResult:
        """``cpns device enroll``: a PNE with UI gets its own EUKey with its user's
        password through the PN GW at ``pan_port`` (004 §5.x.1); the password goes on
        standard input, never on the command line."""
        args = [
            "device",
            "enroll",
            "--data-dir",
            str(self.device_dir(name)),
            "--gateway",
            f"127.0.0.1:{pan_port}",
            "--user",
            user_id,
            "--password-stdin",
            *extra,
        ]
        if entity_id is not None:
            args += ["--entity-id", entity_id]
        return self.cpns(*args, stdin=password + "\n", check=check)

    def start_device(
        self,
        name: str,
        *,
        pan_port: int,
        once: bool = True,
        timeout: float = 60.0,
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``cpns device run`` against a gateway's PAN port (``extra``: more options,
        e.g. ``--gateway-id``)."""
        args = [
            "device",
            "run",
            "--data-dir",
            str(self.device_dir(name)),
            "--gateway",
            f"127.0.0.1:{pan_port}",
            "--timeout",
            str(timeout),
        ]
        if once:
            args.append("--once")
        return self.start(name, *args, *extra)

    def gateway_status(self, name: str = "gw") -> dict[str, Any]:
        """``cpns gateway status`` as JSON."""
        out = self.cpns("gateway", "status", "--data-dir", str(self.gateway_dir(name))).stdout
        view: dict[str, Any] = json.loads(out)
        return view

    def device_status(self, name: str) -> dict[str, Any]:
        """``cpns device status`` as JSON."""
        out = self.cpns("device", "status", "--data-dir", str(self.device_dir(name))).stdout
        view: dict[str, Any] = json.loads(out)
        return view

    def wait_attached(
        self, pne_ids: Sequence[str], *, name: str = "gw", timeout: float = 60.0
    ) -> None:
        """Wait until every PNE of ``pne_ids`` is attached to the gateway ``name``."""
        deadline = time.monotonic() + timeout
        missing: set[str] = set(pne_ids)
        while time.monotonic() < deadline:
            missing = set(pne_ids) - set(self.gateway_status(name).get("attached", []))
            if not missing:
                return
            time.sleep(0.1)
        raise TransportError(f"not attached within {timeout:.0f}s: {sorted(missing)}")

    def establish(
        self,
        name: str,
        *,
        pn_id: str,
        invite: Sequence[str] = (),
        local_eukey: bool = False,
        timeout: float = 60.0,
    ) -> tuple[CommandResult, dict[str, Any]]:
        """``cpns device establish --json`` on the PNE ``name`` (its agent must run): a PN
        Establishment it originates (002 §7.5.4); the result and its JSON."""
        args = [
            "device",
            "establish",
            "--data-dir",
            str(self.device_dir(name)),
            "--pn-id",
            pn_id,
            "--timeout",
            str(timeout),
            "--json",
        ]
        for pne_id in invite:
            args += ["--invite", pne_id]
        if local_eukey:
            args.append("--local-eukey")
        result = self.cpns(*args, check=False, timeout=timeout + 60)
        try:
            reply: dict[str, Any] = json.loads(result.stdout)
        except json.JSONDecodeError:
            reply = {"ok": False, "status": "NO_REPLY", "error": result.stderr}
        return result, reply

    def wait(self, name: str, timeout: float = 60.0) -> int:
        """Wait for a daemon started with :meth:`start` to exit; return its code."""
        daemon = self._daemons[name]
        try:
            return daemon.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TransportError(
                f"{name} still running after {timeout:.0f}s:\n" + self.log(name)
            ) from None

    @contextlib.contextmanager
    def running(self) -> Iterator[LocalDeployment]:
        """Stop every daemon when the block ends, whatever happens."""
        try:
            yield self
        finally:
            self.stop_all()
