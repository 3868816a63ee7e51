"""Load-time checks of what a configuration names on disk: certificates, keys and CA bundles.

Why here and not in the model: `gateway.config.model` is data only (building it opens no file and
imports no ssl), while these checks must open the files and build the TLS contexts the gateway
will use, so that, like `nginx -t`, a key that does not match its certificate is a config error
at load and not a failure at start. `gateway.config.parse` runs them once the model is built and
reports each with its key path, so it gets the line that key was written on.
"""

from __future__ import annotations

from gateway.config.model import Config, ListenerTls, UpstreamTls
from gateway.config.schema import Issue
from gateway.tls import client_context, server_context


def check(config: Config) -> list[Issue]:
    """Every problem with the files `config` names (empty: all loadable); at most one per section."""
    issues: list[Issue] = []
    for name, upstream in config.upstreams.items():
        if upstream.tls is not None:
            issues += _upstream_tls(upstream.tls, f"upstreams.{name}.tls")
    if config.tls is not None:
        issues += _listener_tls(config.tls, "tls")
    return issues


def _unreadable(file: str, path: str) -> Issue | None:
    """A file the gateway must read at start that it cannot read now."""
    try:
        with open(file, "rb"):
            pass
    except OSError as e:
        return Issue(path, f"cannot read {file!r}: {e.strerror or e}")
    return None


def _listener_tls(tls: ListenerTls, path: str) -> list[Issue]:
    for file, key in ((tls.cert, "cert"), (tls.key, "key")):
        issue = _unreadable(file, f"{path}.{key}")
        if issue is not None:
            return [issue]
    try:
        server_context(tls)  # a key that does not match the certificate fails here
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        return [Issue(path, f"cannot load certificate and key: {e}")]
    return []


def _upstream_tls(tls: UpstreamTls, path: str) -> list[Issue]:
    if tls.ca is not None:
        issue = _unreadable(tls.ca, f"{path}.ca")
        if issue is not None:
            return [issue]
    try:
        client_context(tls)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        return [Issue(f"{path}.ca", f"cannot load CA file: {e}")]
    return []
