"""TLS contexts: the proxy listener's (server side) and one per upstream pool (client side).

Both speak HTTP/1.1 only (ALPN `http/1.1`) and refuse anything older than TLS 1.2. Upstream
verification is on by default: the chain must lead to the system store (or to `ca` when set) and
the certificate must name `server_name` (default: the target's host, an IP SAN for an IP).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config.model import ListenerTls, UpstreamTls

ALPN = ["http/1.1"]


def server_context(tls: ListenerTls) -> ssl.SSLContext:
    """The listener's context: certificate chain and key from `tls`; raises ssl.SSLError/OSError."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.set_alpn_protocols(ALPN)
    return ctx


def reload_server_context(ctx: ssl.SSLContext, tls: ListenerTls) -> None:
    """Load a rotated certificate into the running listener: new handshakes use it."""
    ctx.load_cert_chain(tls.cert, tls.key)


def client_context(tls: UpstreamTls | None) -> ssl.SSLContext | None:
    """The context for connections to an upstream's targets; None when TLS is off."""
    if tls is None or not tls.enabled:
        return None
    if tls.verify:
        # cafile given: trust only that CA bundle; else the system's default store.
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    return ctx
