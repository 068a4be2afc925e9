"""Configuration of the PN GW daemon: ``<data_dir>/gateway.toml`` plus environment overrides.

``cpns gateway enroll`` writes the file once (Entity ID, server URL, certificate) and
every later command reads it, so an operator types the server's address only once
(DESIGN §7: TOML configuration with environment overrides). Any field can be overridden
for one run with ``CPNS_GATEWAY_<FIELD>`` (e.g. ``CPNS_GATEWAY_PAN_PORT=7000``), which is
how containers and tests reconfigure a daemon without rewriting its file.

The file holds no secret: the EUKey lives in the sealed key store beside it
(:mod:`cpns.store.keystore`), so the configuration can be read, copied and diffed freely.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from cpns.errors import ConfigurationError
from cpns.messages.constants import ID_PATTERN
from cpns.store.masterkey import write_private_file

__all__ = [
    "CONFIG_FILE",
    "CONTROL_SOCKET",
    "DEFAULT_PAN_PORT",
    "ENV_PREFIX",
    "OPERATOR_PORT_FILE",
    "PAN_PORT_MEMO",
    "PORT_FILE",
    "GatewayConfig",
    "check_server_url",
    "load_config",
    "write_config",
]

#: Name of the configuration file inside the data directory.
CONFIG_FILE: Final = "gateway.toml"
#: Where the daemon writes the PAN port it bound (tests and scripts read it); removed at
#: a clean stop.
PORT_FILE: Final = "gateway.port"
#: The PAN port used when gateway.toml names none: a fixed, documented port, so PNEs find
#: a restarted gateway where they found it before.
DEFAULT_PAN_PORT: Final = 7700
#: With ``pan_port = 0`` the daemon binds any free port the first time and remembers it
#: here; every later start binds the same port again (the file outlives the daemon).
PAN_PORT_MEMO: Final = "gateway.pan-port"
#: Where the daemon writes the operator port it bound, when ``operator_port`` is set.
OPERATOR_PORT_FILE: Final = "operator.port"
#: The daemon's control socket (JSON lines), inside the data directory.
CONTROL_SOCKET: Final = "control.sock"
#: Prefix of the environment overrides.
ENV_PREFIX: Final = "CPNS_GATEWAY_"


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Everything the PN GW daemon needs besides its keys."""

    #: Directory holding gateway.toml, the key store, the port file and the control socket.
    data_dir: Path
    #: The gateway's Entity ID (its Digest username).
    entity_id: str
    #: Base URL of the CPNS Server, ``https://host:port``.
    server_url: str
    #: The certificate (file) the gateway trusts for the server, and nothing else.
    ca_file: Path
    #: Entity ID of the CPNS Server (destination of our requests).
    server_id: str = "cpns-server"
    #: Address the PAN listener binds.
    pan_host: str = "127.0.0.1"
    #: PAN TCP port (default 7700). 0: a free port picked at the first start, remembered
    #: in ``gateway.pan-port`` and bound again at every later start.
    pan_port: int = DEFAULT_PAN_PORT
    #: Seconds for one HTTP try to the server.
    per_try_timeout: float = 5.0
    #: Extra tries after a connection error or timeout.
    retries: int = 2
    #: Seconds between background resends of requests still waiting for the server.
    retry_interval: float = 30.0
    #: PAN: seconds a new link has to complete its first frame (the PNEHello); then it is
    #: closed. Links that never say who they are hold a slot only this long.
    pan_hello_timeout: float = 10.0
    #: PAN: seconds an attached link may go without a complete frame (the keep-alive);
    #: then it is closed and the PNE agent reconnects (and is offered any pending key).
    pan_idle_timeout: float = 900.0
    #: PAN: seconds the rest of a frame may take once its 4-byte header arrived, and a
    #: send may wait for a peer that does not read.
    pan_frame_timeout: float = 10.0
    #: PAN: seconds a PNE has to answer the PN GW in a PN Establishment (its invitation, its
    #: AUTHENTICATE Request) or a LocalEUKey authentication; then it is reported TIMEOUT
    #: and the others go on.
    pan_answer_timeout: float = 10.0
    #: PAN: most links open at once; more are closed at once, without a reply. Lowered at
    #: start-up to what the process's file-descriptor limit leaves after a reserve of 64
    #: for the control socket, the server link and the store.
    pan_max_links: int = 512
    #: PAN: most links open at once from one source address.
    pan_max_links_per_source: int = 32
    #: PAN: most links announcing the same PNE ID at once (one real PNE plus reconnections
    #: whose old link is not yet seen dead); a further PNEHello with that ID is refused.
    pan_links_per_pne: int = 4
    #: Address of the operator listener (/metrics, /healthz, /readyz; plain HTTP, no
    #: authentication): keep it on loopback or a management network (docs/metrics.md).
    operator_host: str = "127.0.0.1"
    #: TCP port of the operator listener; 0 (the default) disables it. The bound port is
    #: written to ``operator.port``.
    operator_port: int = 0

    def __post_init__(self) -> None:
        for name in ("entity_id", "server_id"):
            if ID_PATTERN.fullmatch(getattr(self, name)) is None:
                raise ConfigurationError(f"{name}: not a valid Entity ID")
        check_server_url(self.server_url)
        if not 0 <= self.pan_port <= 65535:
            raise ConfigurationError("pan_port must be 0..65535")
        if not 0 <= self.operator_port <= 65535:
            raise ConfigurationError("operator_port must be 0..65535 (0: no operator listener)")
        if self.operator_port and self.operator_port == self.pan_port:
            raise ConfigurationError("operator_port must differ from pan_port")
        if self.per_try_timeout <= 0 or self.retries < 0 or self.retry_interval <= 0:
            raise ConfigurationError("timeouts and intervals must be positive, retries >= 0")
        for name in (
            "pan_hello_timeout",
            "pan_idle_timeout",
            "pan_frame_timeout",
            "pan_answer_timeout",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        for name in ("pan_max_links", "pan_max_links_per_source", "pan_links_per_pne"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1")

    @property
    def control_socket(self) -> Path:
        """Path of the Unix control socket."""
        return self.data_dir / CONTROL_SOCKET

    @property
    def port_file(self) -> Path:
        """Path of the file receiving the bound PAN port."""
        return self.data_dir / PORT_FILE

    @property
    def pan_port_memo(self) -> Path:
        """Path of the file remembering the PAN port picked for ``pan_port = 0``."""
        return self.data_dir / PAN_PORT_MEMO

    @property
    def config_file(self) -> Path:
        """Path of gateway.toml."""
        return self.data_dir / CONFIG_FILE


def check_server_url(url: str) -> None:
    """Refuse a server URL that is not ``https://host[:port][/prefix]`` (issue 5 item 4).

    Over plain http the enrolment's password proof would travel in clear and fall to an
    offline dictionary attack, and the Digest exchanges would lose the server certificate
    check: there is no setting that allows it.

    Raises:
        ConfigurationError: another scheme, no host, or a bad port.
    """
    shown = url if len(url) <= 200 else url[:200] + "..."
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigurationError(f"server URL {shown!r} is not a valid URL") from None
    if parts.scheme.lower() != "https":
        raise ConfigurationError(
            f"server URL {shown!r} refused: only https:// is allowed (over http the "
            "password proof and the Digest exchanges would travel unprotected)"
        )
    if not parts.hostname or port == 0:
        raise ConfigurationError(f"server URL {shown!r}: expected https://host:port")


#: Fields stored in gateway.toml, with their types (data_dir is where the file is).
_FIELDS: Final = {f.name: f.type for f in dataclasses.fields(GatewayConfig) if f.name != "data_dir"}


def _convert(name: str, raw: object, origin: str) -> object:
    kind = _FIELDS[name]
    try:
        if kind == "int":
            if isinstance(raw, bool):
                raise TypeError
            return int(raw)  # type: ignore[call-overload]  # str or int; checked by except
        if kind == "float":
            if isinstance(raw, bool):
                raise TypeError
            return float(raw)  # type: ignore[arg-type]  # str, int or float
        if kind == "Path":
            if not isinstance(raw, str):
                raise TypeError
            return Path(raw)
        if not isinstance(raw, str):
            raise TypeError
        return raw
    except (TypeError, ValueError):
        raise ConfigurationError(f"{origin}: {name} must be a {kind}") from None


def load_config(
    data_dir: Path | str,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> GatewayConfig:
    """Read ``<data_dir>/gateway.toml``, apply ``CPNS_GATEWAY_*`` then ``overrides``.

    Relative ``ca_file`` values are taken relative to the data directory.

    Raises:
        ConfigurationError: the file is missing or invalid, or a value is wrong.
    """
    data_dir = Path(data_dir)
    path = data_dir / CONFIG_FILE
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(
            f"{path} not found: enrol the gateway first (cpns gateway enroll)"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    values: dict[str, object] = {}
    for name, raw in table.items():
        if name not in _FIELDS:
            raise ConfigurationError(f"{path}: unknown setting {name!r}")
        values[name] = _convert(name, raw, str(path))
    env = os.environ if environ is None else environ
    for name in _FIELDS:
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _convert(name, env[var], var)
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            raise ConfigurationError(f"unknown setting {name!r}")
        values[name] = value
    missing = [n for n in ("entity_id", "server_url", "ca_file") if n not in values]
    if missing:
        raise ConfigurationError(f"{path}: missing {', '.join(missing)}")
    ca = values["ca_file"]
    if isinstance(ca, Path) and not ca.is_absolute():
        values["ca_file"] = data_dir / ca
    try:
        return GatewayConfig(data_dir=data_dir, **values)  # type: ignore[arg-type]  # checked
    except TypeError as exc:
        raise ConfigurationError(str(exc)) from None


def _toml_string(value: str) -> str:
    """A TOML basic string (escapes quotes, backslashes and control characters)."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def write_config(config: GatewayConfig) -> None:
    """Write ``gateway.toml`` for ``config`` atomically (the ca_file path made absolute)."""
    lines = ["# PN GW configuration, written by `cpns gateway enroll`; no secrets here.", ""]
    for name in _FIELDS:
        value = getattr(config, name)
        if isinstance(value, Path):
            value = str(value.resolve())
        if isinstance(value, str):
            lines.append(f"{name} = {_toml_string(value)}")
        else:
            lines.append(f"{name} = {value!r}")
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(config.config_file, ("\n".join(lines) + "\n").encode(), overwrite=True)
