"""TLS on the listener and to upstreams, with certificates made at test time by trustme."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme

from gateway.config.parse import load_text
from gateway.config.schema import ConfigError
from tests.helpers import (
    HEADER,
    Backend,
    GatewayFactory,
    fetch,
    started_servers,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    """cert chain and key as two PEM files, the way operators usually have them."""
    chain, key = directory / f"{name}.crt", directory / f"{name}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return chain, key


def write_ca(ca: trustme.CA, directory: Path) -> Path:
    path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class TlsBackend(Backend):
    """The default echo backend served over TLS; records the SNI names clients sent."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        super().__init__(name="tls-backend")
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.ssl_context)
        self.sni: list[str | None] = []
        self.ssl_context.sni_callback = self._record_sni

    def _record_sni(self, _sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.sni.append(name)


TlsBackendFactory = Callable[[trustme.LeafCert], Awaitable[TlsBackend]]


@pytest.fixture
async def tls_backend_factory() -> AsyncIterator[TlsBackendFactory]:
    async with started_servers(TlsBackend) as make:
        yield make


def upstream_config(address: str, tls: str = "") -> str:
    text = HEADER + f"upstreams:\n  api:\n    targets:\n      - address: {address}\n"
    if tls:
        text += f"    tls: {tls}\n"
    return text + "routes:\n  - name: api\n    upstream: api\n"


async def test_client_to_gateway_over_tls(
    ca: trustme.CA, backend: Backend, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    cert, key = write_pair(ca.issue_cert("gateway.test", "127.0.0.1"), tmp_path, "gateway")
    app = await gateway_factory(upstream_config(backend.address) + f"tls: {{cert: '{cert}', key: '{key}'}}\n")
    assert app.proxy.ssl_context is not None
    url = f"https://127.0.0.1:{app.proxy.port}/hello"
    status, headers, raw = await fetch(None, url, tls=client_ssl(ca))
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    body = json.loads(raw)
    assert isinstance(body, dict)
    headers = body["headers"]
    assert isinstance(headers, dict)
    assert headers["X-Forwarded-Proto"] == "https"  # set automatically from the TLS listener
    assert body["path"] == "/hello"
    # The listener does not speak plain HTTP any more; an untrusting client refuses it.
    with pytest.raises(aiohttp.ClientError):
        await fetch(None, app)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await fetch(None, url)


async def test_plain_listener_forwards_http_proto(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(upstream_config(backend.address))
    status, headers, raw = await fetch(None, app)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    body = json.loads(raw)
    assert isinstance(body, dict)
    assert body["headers"]["X-Forwarded-Proto"] == "http"


async def test_gateway_to_tls_backend_with_custom_ca_and_sni(
    ca: trustme.CA,
    tls_backend_factory: TlsBackendFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
) -> None:
    tls_backend = await tls_backend_factory(ca.issue_cert("backend.test"))
    ca_path = write_ca(ca, tmp_path)
    app = await gateway_factory(
        upstream_config(tls_backend.address, f"{{verify: true, ca: '{ca_path}', server_name: backend.test}}")
    )
    pool = app.proxy.runtime.pools["api"]
    assert pool.ssl_context is not None and pool.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert pool.server_hostname(pool.targets[0]) == "backend.test"
    # Target counters are process-wide per address (they outlive reloads, like Prometheus
    # counters): another test's backend may have had this port before, so count from here.
    opened = pool.targets[0].stats.connections_opened
    for _ in range(3):  # the pooled TLS connection is reused
        status, headers, raw = await fetch(None, app, "/over-tls")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        body = json.loads(raw)
        assert isinstance(body, dict)
        assert body["name"] == "tls-backend" and body["path"] == "/over-tls"
    assert tls_backend.sni == ["backend.test"]  # one handshake
    assert pool.targets[0].stats.connections_opened - opened == 1


async def test_tls_backend_by_ip_address(
    ca: trustme.CA,
    tls_backend_factory: TlsBackendFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
) -> None:
    """Without server_name the target's host is the name to verify: an IP SAN for an IP target."""
    tls_backend = await tls_backend_factory(ca.issue_cert("127.0.0.1"))
    app = await gateway_factory(upstream_config(tls_backend.address, f"{{ca: '{write_ca(ca, tmp_path)}'}}"))
    status, _, _ = await fetch(None, app)
    assert status == 200


async def test_untrusted_certificate_is_a_502(
    ca: trustme.CA,
    tls_backend_factory: TlsBackendFactory,
    gateway_factory: GatewayFactory,
    tmp_path: Path,
) -> None:
    tls_backend = await tls_backend_factory(ca.issue_cert("backend.test", "127.0.0.1"))
    # verify on (the default) against the system store, which does not know the test CA
    app = await gateway_factory(upstream_config(tls_backend.address, "{enabled: true}"))
    status, _, _ = await fetch(None, app)
    assert status == 502
    assert app.proxy.runtime.pools["api"].targets[0].stats.connect_errors >= 1
    # the right CA but the wrong name is refused too
    app2 = await gateway_factory(
        upstream_config(tls_backend.address, f"{{ca: '{write_ca(ca, tmp_path)}', server_name: other.test}}")
    )
    status, _, _ = await fetch(None, app2)
    assert status == 502
    # verify: false only encrypts
    app3 = await gateway_factory(upstream_config(tls_backend.address, "{verify: false}"))
    status, _, _ = await fetch(None, app3)
    assert status == 200


async def test_tls_disabled_upstream_is_plain(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(upstream_config(backend.address, "{enabled: false}"))
    assert app.proxy.runtime.pools["api"].ssl_context is None
    status, _, _ = await fetch(None, app)
    assert status == 200


def test_tls_files_are_checked_at_load(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_pair(ca.issue_cert("gateway.test"), tmp_path, "gateway")
    _, other_key = write_pair(ca.issue_cert("other.test"), tmp_path, "other")
    with pytest.raises(ConfigError) as e:
        load_text(f"tls: {{cert: '{tmp_path / 'missing.crt'}', key: '{key}'}}\n", "<t>")
    assert "tls.cert" in str(e.value) and "cannot read" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_text(f"tls: {{cert: '{cert}', key: '{other_key}'}}\n", "<t>")  # key of another cert
    assert "cannot load certificate and key" in str(e.value)
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as e:
        load_text(upstream_config("127.0.0.1:1", f"{{ca: '{bogus}'}}"), "<t>")
    assert "upstreams.api.tls.ca" in str(e.value)
    config = load_text(f"tls: {{cert: '{cert}', key: '{key}'}}\n", "<t>")
    assert config.tls is not None and config.tls.cert == str(cert)


async def test_reload_loads_a_rotated_listener_certificate(
    ca: trustme.CA, backend: Backend, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "gateway")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(upstream_config(backend.address) + f"tls: {{cert: '{cert}', key: '{key}'}}\n")
    app = await gateway_factory(cfg.read_text(), str(cfg))
    url = f"https://127.0.0.1:{app.proxy.port}/"
    assert (await fetch(None, url, tls=client_ssl(ca)))[0] == 200
    other_ca = trustme.CA()
    write_pair(other_ca.issue_cert("127.0.0.1"), tmp_path, "gateway")  # rotate in place
    assert app.reload() == (True, [])
    assert (await fetch(None, url, tls=client_ssl(other_ca)))[0] == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await fetch(None, url, tls=client_ssl(ca))
