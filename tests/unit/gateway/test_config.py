"""The PN GW configuration (gateway.toml + CPNS_GATEWAY_* overrides): values it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpns.errors import ConfigurationError
from cpns.gateway.config import GatewayConfig, check_server_url, load_config, write_config


def _config(tmp_path: Path, **kw: object) -> GatewayConfig:
    values: dict[str, object] = {
        "data_dir": tmp_path / "gw",
        "entity_id": "gw-1",
        "server_url": "https://cpns.invalid:8443",
        "ca_file": tmp_path / "ca.pem",
        "pan_port": 0,
    }
    values.update(kw)
    return GatewayConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "http://cpns.example:8443",
        "HTTP://cpns.example",
        "ws://cpns.example",
        "cpns.example:8443",
        "https://",
        "https://cpns.example:99999",
    ],
)
def test_server_url_must_be_https(tmp_path: Path, url: str) -> None:
    """Issue 5 item 4: the gateway never talks to its server over anything but https
    (the password proof and Digest exchanges would be exposed): any other URL is a
    ConfigurationError (exit 2 in the CLI)."""
    with pytest.raises(ConfigurationError):
        check_server_url(url)
    with pytest.raises(ConfigurationError):
        _config(tmp_path, server_url=url)


def test_https_urls_are_accepted(tmp_path: Path) -> None:
    """https with a host, an optional port and an optional path prefix is fine."""
    for url in ("https://cpns.example", "https://127.0.0.1:8443", "https://h:1/prefix/"):
        check_server_url(url)
        assert _config(tmp_path, server_url=url).server_url == url


def test_an_http_url_in_the_file_or_the_environment_is_refused(tmp_path: Path) -> None:
    """Issue 5 item 4: the check covers gateway.toml and CPNS_GATEWAY_SERVER_URL too, so
    no later command (run, assign) can be pointed at http."""
    config = _config(tmp_path)
    write_config(config)
    with pytest.raises(ConfigurationError, match="only https"):
        load_config(config.data_dir, environ={"CPNS_GATEWAY_SERVER_URL": "http://x:1"})
    text = config.config_file.read_text().replace("https://", "http://")
    config.config_file.write_text(text)
    with pytest.raises(ConfigurationError, match="only https"):
        load_config(config.data_dir, environ={})


def test_the_default_pan_port_is_fixed_and_documented(tmp_path: Path) -> None:
    """Issue 5 item 13: without a port in gateway.toml the PAN listener uses 7700 (not
    "any free port"), so a restarted gateway listens where its PNEs look for it; the
    enrol command writes that default into gateway.toml."""
    from cpns.cli.main import build_parser
    from cpns.gateway.config import DEFAULT_PAN_PORT

    assert DEFAULT_PAN_PORT == 7700
    config = GatewayConfig(
        data_dir=tmp_path / "gw",
        entity_id="gw-1",
        server_url="https://cpns.invalid",
        ca_file=tmp_path / "ca.pem",
    )
    assert config.pan_port == 7700
    argv = ["gateway", "enroll", "--entity-id", "gw-1", "--server", "https://h", "--ca", "c"]
    args = build_parser().parse_args([*argv, "--user", "alice"])
    assert args.pan_port == 7700
