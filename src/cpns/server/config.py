"""CPNS Server settings (``<data_dir>/server.toml``, ``CPNS_SERVER_*`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cpns.config import load_settings
from cpns.messages.constants import ID_PATTERN
from cpns.store.postgres import is_dsn

__all__ = ["ServerConfig", "load_server_config"]

_ALGORITHMS = ("SHA-256", "MD5")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Everything ``cpns server run`` needs. Paths are relative to ``data_dir``."""

    #: Directory holding the configuration, database, master key and TLS files.
    data_dir: Path = Path(".")
    #: Address to listen on (loopback by default).
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one and writes it to ``server.port``.
    port: int = 8443
    #: Entity ID of this CPNS Server (the source of its messages).
    server_id: str = "cpns-server"
    #: Digest realm; also salts every user's password key, so it is fixed at init.
    realm: str = "cpns"
    #: Digest algorithms offered, most preferred first. "MD5" only for legacy clients.
    digest_algorithms: tuple[str, ...] = ("SHA-256",)
    #: How many Digest ``nc`` values below the highest seen on a nonce are still accepted
    #: once each (RFC 7616 §5.4): a client sending concurrent requests on one nonce has them
    #: arrive out of order. 1 would demand strictly increasing counters.
    digest_nc_window: int = 64
    #: Accepted clock difference for request Time values, seconds.
    time_window: int = 300
    #: n, the length of a PNE's EUKey chain (003 §7.4.2.1.1.2 step 4).
    chain_length: int = 16
    #: Failed password proofs per User ID (and procedure) from all sources together before
    #: proofs for it are refused unchecked with TOO_MANY_ATTEMPTS: the online guessing
    #: bound per window (deviations D-SRV-1).
    max_auth_failures: int = 50
    #: Failed proofs per User ID from one source (client address) before that source's
    #: proofs for the user are refused (D-SRV-1).
    max_auth_failures_per_user_source: int = 5
    #: Failed proofs from one source, all User IDs together, before every proof from it is
    #: refused (D-SRV-1).
    max_auth_failures_per_source: int = 30
    #: Seconds a failed proof keeps counting after the last one.
    auth_failure_window: int = 900
    #: Seconds between writes of the in-memory failure counters and aggregated audit of
    #: unauthenticated refusals (D-SRV-2).
    audit_flush_interval: int = 2
    #: Days audit events are kept; older ones are purged by the running server (D-SRV-2).
    audit_retention_days: int = 90
    #: Seconds from accepting a connection (or from the first byte of a later request on
    #: it) for the TLS handshake, request line, headers and body to arrive; a connection
    #: that misses it is closed (slowloris guard).
    request_timeout: int = 10
    #: Seconds an idle keep-alive connection is kept open between requests.
    keep_alive_timeout: int = 30
    #: Most bytes of request line plus headers; a larger head is answered 431 and closed.
    max_header_bytes: int = 16384
    #: Most HTTPS connections open at once; lowered at start to the open-file limit minus
    #: 64. Connections over a cap are reset on accept, before any TLS work.
    max_connections: int = 1024
    #: Most HTTPS connections open at once from one client address.
    max_connections_per_source: int = 64
    #: The database: a SQLite file name (relative to ``data_dir``; the default), or a
    #: PostgreSQL URL ``postgresql://user:password@host:port/dbname``. Kept out of repr
    #: because a URL may hold a password; ``CPNS_SERVER_DATABASE`` overrides it, and the
    #: password may instead come from libpq (``PGPASSWORD``, ``~/.pgpass``).
    database: str = field(default="cpns.db", repr=False)
    #: Master key file (0600) sealing secrets at rest; CPNS_MASTER_KEY overrides it.
    master_key_file: str = "master.key"
    #: TLS certificate (PEM) presented to gateways.
    cert_file: str = "tls/server-cert.pem"
    #: TLS private key (PEM).
    key_file: str = "tls/server-key.pem"
    #: Emit JSON log lines.
    log_json: bool = False
    #: Address of the operator listener (/metrics, /healthz, /readyz; plain HTTP, no
    #: authentication): keep it on loopback or a management network (docs/metrics.md).
    operator_host: str = "127.0.0.1"
    #: TCP port of the operator listener; 0 (the default) disables it. The bound port is
    #: written to ``operator.port``.
    operator_port: int = 0
    #: Seconds the /readyz store read may take before the server is reported not ready.
    readiness_timeout: int = 2

    def __post_init__(self) -> None:
        if ID_PATTERN.fullmatch(self.server_id) is None:
            raise ValueError(f"server_id {self.server_id!r} is not a valid Entity ID")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535")
        if not 0 <= self.operator_port <= 65535:
            raise ValueError("operator_port must be 0..65535 (0: no operator listener)")
        if self.operator_port and self.operator_port == self.port:
            raise ValueError("operator_port must differ from port")
        if not 1 <= self.readiness_timeout <= 60:
            raise ValueError("readiness_timeout must be 1..60 seconds")
        bad = [a for a in self.digest_algorithms if a not in _ALGORITHMS]
        if bad or not self.digest_algorithms:
            raise ValueError(f"digest_algorithms must be a non-empty list of {_ALGORITHMS}")
        if not 1 <= self.audit_flush_interval <= 3600:
            raise ValueError("audit_flush_interval must be 1..3600 seconds")
        if not 1 <= self.audit_retention_days <= 36500:
            raise ValueError("audit_retention_days must be 1..36500")
        if not 1 <= self.digest_nc_window <= 1024:
            raise ValueError("digest_nc_window must be 1..1024")
        if not self.realm or '"' in self.realm:
            raise ValueError("realm must be non-empty and contain no double quote")

    def path(self, name: str) -> Path:
        """A configured file name resolved against ``data_dir``."""
        return self.data_dir / name

    def store_target(self) -> str:
        """What the store opens: the PostgreSQL URL as given, or the SQLite file's path."""
        if is_dsn(self.database):
            return self.database
        return str(self.path(self.database))


def load_server_config(data_dir: Path) -> ServerConfig:
    """Read ``<data_dir>/server.toml`` with ``CPNS_SERVER_*`` environment overrides."""
    return load_settings(
        ServerConfig,
        data_dir / "server.toml",
        env_prefix="CPNS_SERVER_",
        base={"data_dir": str(data_dir)},
    )
