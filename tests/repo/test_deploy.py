"""deploy/: the Kubernetes manifests parse and agree with their gateway config; the systemd unit
gives the drain time to finish."""

from __future__ import annotations

import configparser
from typing import Any

import yaml

from gateway.config.model import parse_address
from gateway.config.parse import load_text
from tests.helpers import ROOT


def manifests() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text(encoding="utf-8")))
    return {d["kind"]: d for d in docs if d}


def test_kubernetes_manifests_parse_and_probe_the_health_port() -> None:
    docs = manifests()
    assert set(docs) == {"ConfigMap", "Deployment", "Service"}
    config = load_text(docs["ConfigMap"]["data"]["gateway.yaml"], "kubernetes.yaml:ConfigMap")
    assert config.health_listen is not None and config.admin_listen is not None
    _, health_port = parse_address(config.health_listen, "health_listen")
    _, admin_port = parse_address(config.admin_listen, "admin_listen")
    _, proxy_port = parse_address(config.listen, "listen")

    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def port_of(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return int(ports[port] if isinstance(port, str) else port)

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert port_of(container["livenessProbe"]) == health_port
    assert port_of(container["readinessProbe"]) == health_port
    assert ports["http"] == proxy_port

    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(admin_port)
    assert notes["prometheus.io/path"] == "/metrics"

    assert pod["spec"]["terminationGracePeriodSeconds"] > config.drain_delay + config.drain_timeout
    assert "lifecycle" not in container  # drain_delay does what a preStop sleep would

    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mount["config"] == "/etc/gateway"
    service = docs["Service"]["spec"]
    assert service["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "gateway.service", encoding="utf-8")
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["ExecStart"].startswith("/opt/gateway/venv/bin/gateway run --config ")
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    default_drain = 0 + 30  # drain_delay + drain_timeout defaults
    assert int(service["TimeoutStopSec"]) > default_drain
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    text = (ROOT / "deploy" / "gateway.service").read_text(encoding="utf-8")
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
