"""Configuration loading: durations, sizes, and `file:line: key: message` errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.model import (
    AccessLogConfig,
    Adaptive,
    Cache,
    CircuitBreakerConfig,
    Config,
    HealthCheck,
    Passive,
    SlowStart,
    Upstream,
    UpstreamTls,
    parse_address,
)
from gateway.config.parse import load_file, load_text
from gateway.config.schema import (
    ConfigError,
    Issue,
    describe,
    parse_duration,
    parse_percent,
    parse_ratio,
    parse_size,
)
from tests.helpers import gateway_cli

VALID = """\
listen: 127.0.0.1:8080
upstreams:
  api:
    balance: round_robin
    targets:
      - address: 127.0.0.1:9001
        weight: 3
      - address: 127.0.0.1:9002
  pool2:
    balance: least_request
    targets:
      - address: 127.0.0.1:9003
routes:
  - name: api
    match: {path_prefix: /api/, methods: [GET, POST], host: "*.example.com", headers: {x-env: prod}}
    upstream: api
    timeouts: {connect: 250ms, response: 2s, idle: 1m}
    max_body_size: 1MB
  - name: exact
    match: {path: /exact}
    upstream: pool2
  - name: retired
    match: {path_prefix: /old/}
    upstream: null
    retry_after: 30
client: {header_read_timeout: 10s, keepalive_timeout: 60s, max_header_bytes: 16KB, max_headers: 100, \
max_url_bytes: 8KB}
"""


def errors_of(text: str, filename: str = "<test>") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(text, filename)
    assert info.value.errors, "a ConfigError must carry at least one message"
    return info.value.errors


# ---- durations and sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 3s ", 3.0),
        ("10", 10.0),
        (2, 2.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_duration_values(value: object, seconds: float) -> None:
    assert parse_duration(value, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["fast", "2 days", "-1s", "1x", True, None, [1], -3])
def test_duration_rejects(value: object) -> None:
    with pytest.raises(Issue) as info:
        parse_duration(value, "timeouts.connect")
    assert info.value.path == "timeouts.connect"


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (512, 512),
        ("512", 512),
        ("100B", 100),
        ("16KB", 16 * 1024),
        ("16k", 16 * 1024),
        ("64MB", 64 * 1024**2),
        ("1MiB", 1024**2),
        ("1GiB", 1024**3),
        ("1.5KB", 1536),
    ],
)
def test_size_values(value: object, size: int) -> None:
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("value", ["big", "-1KB", -1, True, "12TB", 1.5])
def test_size_rejects(value: object) -> None:
    with pytest.raises(Issue):
        parse_size(value, "max_body_size")


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:80", "listen") == ("127.0.0.1", 80)
    assert parse_address("[::1]:8080", "listen") == ("::1", 8080)
    for bad in ("127.0.0.1", ":80", "host:port", "h:70000"):
        with pytest.raises(Issue):
            parse_address(bad, "listen")


# ---- a full valid file ---------------------------------------------------------------------


def test_valid_config_is_built() -> None:
    c = load_text(VALID, "<test>")
    assert isinstance(c, Config)
    assert c.listen == "127.0.0.1:8080"
    api = c.upstreams["api"]
    assert api.balance == "round_robin"
    assert [(t.address, t.weight) for t in api.targets] == [("127.0.0.1:9001", 3), ("127.0.0.1:9002", 1)]
    assert c.upstreams["pool2"].balance == "least_request"
    assert [r.name for r in c.routes] == ["api", "exact", "retired"]
    r = c.routes[0]
    assert r.upstream == "api"
    assert r.match.path_prefix == "/api/"
    assert r.match.methods == ("GET", "POST")
    assert r.match.host == "*.example.com"
    assert r.match.headers == {"x-env": "prod"}
    assert r.timeouts is not None
    assert (r.timeouts.connect, r.timeouts.response, r.timeouts.idle) == (0.25, 2.0, 60.0)
    assert r.max_body_size == 1024**2
    assert c.routes[1].timeouts is None
    assert c.routes[2].upstream is None
    assert c.routes[2].retry_after == 30
    assert c.client.header_read_timeout == 10.0
    assert c.client.keepalive_timeout == 60.0
    assert c.client.max_header_bytes == 16 * 1024
    assert c.client.max_headers == 100
    assert c.client.max_url_bytes == 8 * 1024


def test_defaults_for_empty_file() -> None:
    c = load_text("", "<test>")
    assert c.routes == ()
    assert c.upstreams == {}
    assert c.timeouts.connect == 1.0
    assert c.timeouts.response == 30.0
    assert c.client.header_read_timeout == 10.0
    assert c.routes == ()


def test_numbers_as_durations_in_yaml() -> None:
    c = load_text("timeouts: {connect: 2, response: 0.5, idle: 1m}\n", "<test>")
    assert (c.timeouts.connect, c.timeouts.response, c.timeouts.idle) == (2.0, 0.5, 60.0)


# ---- errors with file:line: key -----------------------------------------------------------------


def test_unknown_upstream_names_file_line_and_key() -> None:
    lines = VALID.splitlines()
    # Point the third route (line 33 of VALID is its `upstream: null`) at a misspelt upstream.
    idx = lines.index("    upstream: null")
    lines[idx] = "    upstream: apii"
    errs = errors_of("\n".join(lines) + "\n")
    assert errs == [f"<test>:{idx + 1}: routes[2].upstream: unknown upstream 'apii'"]


def test_unknown_upstream_exact_line_14() -> None:
    text = (
        "listen: 127.0.0.1:8080\n"  # 1
        "upstreams:\n"  # 2
        "  api:\n"  # 3
        "    targets:\n"  # 4
        "      - address: 127.0.0.1:9001\n"  # 5
        "routes:\n"  # 6
        "  - name: one\n"  # 7
        "    upstream: api\n"  # 8
        "  - name: two\n"  # 9
        "    match: {path_prefix: /two/}\n"  # 10
        "    upstream: api\n"  # 11
        "  - name: three\n"  # 12
        "    match: {path_prefix: /three/}\n"  # 13
        "    upstream: apii\n"  # 14
    )
    assert errors_of(text) == ["<test>:14: routes[2].upstream: unknown upstream 'apii'"]


def test_unknown_key_is_an_error_with_line() -> None:
    text = (
        "listen: 127.0.0.1:8080\nupstreams:\n  api:\n    targets:\n"
        "      - address: 127.0.0.1:9001\n        wieght: 3\n"
    )
    (err,) = errors_of(text)
    assert err.startswith("<test>:6: upstreams.api.targets[0].wieght: unknown key")
    assert "weight" in err  # lists the known keys


def test_unknown_top_level_key() -> None:
    (err,) = errors_of("listen: 127.0.0.1:8080\nlisten_port: 80\n")
    assert err.startswith("<test>:2: listen_port: unknown key")


def test_unknown_key_in_match() -> None:
    text = "routes:\n  - name: a\n    upstream: null\n    match:\n      prefix: /x\n"
    (err,) = errors_of(text)
    assert err.startswith("<test>:5: routes[0].match.prefix: unknown key")


def test_yaml_syntax_error_line() -> None:
    text = "listen: 127.0.0.1:8080\nroutes:\n  - name: a\n   upstream: b\n"
    (err,) = errors_of(text)
    assert err.startswith("<test>:4: YAML syntax error")


def test_yaml_unclosed_flow_sequence() -> None:
    (err,) = errors_of("listen: 127.0.0.1:8080\nupstreams:\n  api: [\n")
    assert err.startswith("<test>:4: YAML syntax error")


def test_missing_required_key() -> None:
    text = (
        "upstreams:\n"
        "  api:\n"
        "    targets:\n"
        "      - address: 127.0.0.1:9001\n"
        "routes:\n"
        "  - name: a\n"
        "    match: {path_prefix: /}\n"
    )
    assert errors_of(text) == ["<test>:6: routes[0].upstream: required key is missing"]


def test_missing_targets() -> None:
    (err,) = errors_of("upstreams:\n  api:\n    balance: round_robin\n")
    assert err == "<test>:2: upstreams.api.targets: required key is missing"


def test_missing_target_address() -> None:
    (err,) = errors_of("upstreams:\n  api:\n    targets:\n      - weight: 2\n")
    assert err == "<test>:4: upstreams.api.targets[0].address: required key is missing"


def test_duplicate_route_names() -> None:
    text = (
        "upstreams:\n"
        "  api:\n"
        "    targets:\n"
        "      - address: 127.0.0.1:9001\n"
        "routes:\n"
        "  - name: a\n"
        "    upstream: api\n"
        "  - name: a\n"
        "    upstream: api\n"
    )
    assert errors_of(text) == ["<test>:8: routes[1].name: duplicate route name 'a'"]


def test_bad_duration_in_file() -> None:
    (err,) = errors_of("listen: 127.0.0.1:8080\ntimeouts:\n  connect: fast\n")
    assert err == "<test>:3: timeouts.connect: expected a duration like 250ms, 2s or 1m, got 'fast'"


def test_bad_size_in_file() -> None:
    (err,) = errors_of("client:\n  max_header_bytes: lots\n")
    assert err.startswith("<test>:2: client.max_header_bytes: expected a size")


def test_bad_balance() -> None:
    (err,) = errors_of("upstreams:\n  api:\n    balance: random\n    targets: [{address: 127.0.0.1:1}]\n")
    assert err.startswith("<test>:3: upstreams.api.balance: expected one of")


def test_bad_weight_and_duplicate_target() -> None:
    (err,) = errors_of("upstreams:\n  api:\n    targets:\n      - {address: 127.0.0.1:1, weight: 0}\n")
    assert err.startswith("<test>:4: upstreams.api.targets[0].weight")
    (err,) = errors_of(
        "upstreams:\n  api:\n    targets:\n      - address: 127.0.0.1:1\n      - address: 127.0.0.1:1\n"
    )
    assert "duplicate target" in err
    assert err.startswith("<test>:")


def test_bad_regex_and_exclusive_paths() -> None:
    (err,) = errors_of("routes:\n  - name: a\n    upstream: null\n    match: {path_regex: '('}\n")
    assert "routes[0].match.path_regex: invalid regular expression" in err
    (err,) = errors_of("routes:\n  - name: a\n    upstream: null\n    match: {path: /a, path_prefix: /b}\n")
    assert "routes[0].match" in err
    (err,) = errors_of("routes:\n  - name: a\n    upstream: null\n    match: {path_prefix: api}\n")
    assert "routes[0].match.path_prefix: must start with /" in err


def test_top_level_not_a_mapping() -> None:
    (err,) = errors_of("- a\n- b\n")
    assert err.startswith("<test>:1:")


def test_bad_listen_address() -> None:
    (err,) = errors_of("listen: localhost\n")
    assert err.startswith("<test>:1: listen:")


def test_load_file_names_the_path(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    assert load_file(good).routes[0].name == "api"
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:8080\nroutes:\n  - name: a\n    upstream: nope\n")
    with pytest.raises(ConfigError) as info:
        load_file(bad)
    assert info.value.errors == [f"{bad}:4: routes[0].upstream: unknown upstream 'nope'"]
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path / "missing.yaml")
    assert str(tmp_path / "missing.yaml") in info.value.errors[0]


# ---- `true`/`false` for a section, percentages and ratios (issue 20) ---------------------------

ONE_UPSTREAM = "upstreams:\n  api:\n    targets: [{address: 127.0.0.1:9001}]\n"  # key lines: 1..3


def upstream_with(line: str) -> Upstream:
    """The upstream `api` with one more key line (line 4 of the file)."""
    return load_text(f"{ONE_UPSTREAM}    {line}\n", "<test>").upstreams["api"]


@pytest.mark.parametrize(
    ("key", "defaults"),
    [
        ("adaptive", Adaptive()),
        ("slow_start", SlowStart()),
        ("passive", Passive()),
        ("health_check", HealthCheck()),
        ("circuit_breaker", CircuitBreakerConfig()),
        ("tls", UpstreamTls()),
    ],
)
def test_true_switches_an_upstream_section_on_with_its_defaults(key: str, defaults: object) -> None:
    assert getattr(upstream_with(f"{key}: true"), key) == defaults
    assert getattr(upstream_with(f"{key}: false"), key) is None


def test_tls_true_on_an_upstream_speaks_tls_with_verification() -> None:
    tls = upstream_with("tls: true").tls
    assert tls is not None and tls.enabled and tls.verify


def test_route_cache_true_and_false() -> None:
    route = "routes:\n  - name: r\n    upstream: null\n    cache: {}\n"
    assert load_text(route.format("true"), "<test>").routes[0].cache == Cache()
    assert load_text(route.format("false"), "<test>").routes[0].cache is None


def test_access_log_true_and_false_switch_enabled() -> None:
    assert load_text("access_log: true\n", "<test>").access_log == AccessLogConfig(enabled=True)
    assert load_text("access_log: false\n", "<test>").access_log == AccessLogConfig(enabled=False)


def test_true_on_a_section_with_a_required_key_reports_the_missing_key() -> None:
    assert errors_of("listen: 127.0.0.1:8080\ntls: true\n") == ["<test>:2: tls.cert: required key is missing"]
    # rate_limit is a mapping or a list of them: `true` picks the mapping and its specific error.
    text = "routes:\n  - name: r\n    upstream: null\n    rate_limit: true\n"
    assert errors_of(text) == ["<test>:4: routes[0].rate_limit.rate: required key is missing"]
    text = "routes:\n  - name: r\n    upstream: null\n    rate_limit: false\n"
    assert load_text(text, "<test>").routes[0].rate_limit is None


def test_false_on_a_section_that_cannot_be_off_is_an_error() -> None:
    (err,) = errors_of(f"{ONE_UPSTREAM}    retry: false\n")
    assert err.startswith("<test>:4: upstreams.api.retry: cannot be switched off")


def test_true_and_false_stay_errors_where_no_section_is_expected() -> None:
    (err,) = errors_of("true\n")  # a file is a mapping, not a switch
    assert err.startswith("<test>:1:") and "expected a mapping" in err
    (err,) = errors_of(f"{ONE_UPSTREAM}    health_check: {{jitter: false}}\n")
    assert err.startswith("<test>:4: upstreams.api.health_check.jitter: expected a duration")
    (err,) = errors_of("upstreams:\n  api:\n    targets: [true]\n")
    assert err == "<test>:3: upstreams.api.targets[0]: expected a mapping, got True"


@pytest.mark.parametrize(
    ("value", "percent"),
    [
        (20, 20.0),
        (20.5, 20.5),
        ("20%", 20.0),
        ("0.5%", 0.5),
        (" 12.5 % ", 12.5),
        ("20", 20.0),
        (0, 0.0),
        (1, 1.0),
        (100, 100.0),
    ],
)
def test_percent_values(value: object, percent: float) -> None:
    assert parse_percent(value, "x") == percent


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (0.2, "write 20% or 20"),
        ("0.2", "write 20% or 20"),
        (0.05, "write 5% or 5"),
        (0.125, "write 12.5% or 12.5"),
    ],
)
def test_a_bare_ratio_is_refused_as_a_percent(value: object, hint: str) -> None:
    with pytest.raises(Issue) as info:
        parse_percent(value, "retry.budget")
    assert info.value.path == "retry.budget"
    assert hint in info.value.message
    assert f"'{value}%'" in info.value.message  # the spelling that means what was written


@pytest.mark.parametrize("value", ["lots", "20%%", "%", True, None, [20]])
def test_percent_rejects(value: object) -> None:
    with pytest.raises(Issue) as info:
        parse_percent(value, "x")
    assert "expected a percentage like 20% or 20" in info.value.message


@pytest.mark.parametrize(
    ("value", "ratio"), [(0.5, 0.5), (1, 1.0), ("50%", 0.5), ("10%", 0.1), ("0.25", 0.25)]
)
def test_ratio_values(value: object, ratio: float) -> None:
    assert parse_ratio(value, "x") == ratio


@pytest.mark.parametrize("value", ["half", True, None])
def test_ratio_rejects(value: object) -> None:
    with pytest.raises(Issue) as info:
        parse_ratio(value, "x")
    assert "expected a ratio like 0.5 or 50%" in info.value.message


def test_retry_budget_as_a_percentage() -> None:
    assert upstream_with("retry: {budget: 20%}").retry.budget == 20.0
    assert upstream_with("retry: {budget: 0.5%}").retry.budget == 0.5
    assert upstream_with("retry: {budget: 20}").retry.budget == 20.0


def test_retry_budget_bare_ratio_names_file_line_and_the_fix() -> None:
    (err,) = errors_of(f"{ONE_UPSTREAM}    retry: {{budget: 0.2}}\n")
    assert err.startswith("<test>:4: upstreams.api.retry.budget: 0.2 looks like a ratio")
    assert "20% or 20" in err


def test_retry_budget_nonsense_and_out_of_range() -> None:
    (err,) = errors_of(f"{ONE_UPSTREAM}    retry: {{budget: lots}}\n")
    assert err == "<test>:4: upstreams.api.retry.budget: expected a percentage like 20% or 20, got 'lots'"
    (err,) = errors_of(f"{ONE_UPSTREAM}    retry: {{budget: 150%}}\n")
    assert err == "<test>:4: upstreams.api.retry.budget: must be a percentage within 0..100"


def test_other_percent_fields_take_percentages() -> None:
    assert upstream_with("passive: {max_ejection_percent: 50%}").passive == Passive(max_ejection_percent=50.0)
    slow = upstream_with("slow_start: {min_weight_percent: 5%}").slow_start
    assert slow is not None and slow.min_weight_percent == 5.0
    (err,) = errors_of(f"{ONE_UPSTREAM}    slow_start: {{min_weight_percent: 0.1}}\n")
    assert err.startswith("<test>:4: upstreams.api.slow_start.min_weight_percent: 0.1 looks like a ratio")


def test_ratio_fields_take_percentages_and_keep_plain_numbers() -> None:
    cb = upstream_with("circuit_breaker: {failure_ratio: 50%}").circuit_breaker
    assert cb is not None and cb.failure_ratio == 0.5
    cb = upstream_with("circuit_breaker: {failure_ratio: 0.25}").circuit_breaker
    assert cb is not None and cb.failure_ratio == 0.25
    assert load_text("access_log: {enabled: true, sample: 10%}\n", "<test>").access_log.sample == 0.1
    (err,) = errors_of(f"{ONE_UPSTREAM}    circuit_breaker: {{failure_ratio: 50}}\n")
    assert err.startswith("<test>:4: upstreams.api.circuit_breaker.failure_ratio: must be within (0, 1]")


def test_reference_shows_percent_ratio_and_switches() -> None:
    rows = {key: (tp, default, text) for key, tp, default, text in describe(Config)}
    assert rows["upstreams.<name>.retry.budget"][:2] == ("percent", "20%")
    assert rows["upstreams.<name>.passive.max_ejection_percent"][0] == "percent"
    assert rows["upstreams.<name>.circuit_breaker.failure_ratio"][0] == "ratio"
    assert "`true`" in rows["upstreams.<name>.adaptive"][2]
    assert "`true`" in rows["access_log"][2]
    assert "`true`" not in rows["tls"][2]  # cert and key are required: `true` alone never works


SPELLINGS = """\
listen: 127.0.0.1:8080
health_listen: null
admin_listen: null
access_log: true
upstreams:
  api:
    targets: [{address: 127.0.0.1:9001}]
    adaptive: true
    slow_start: true
    passive: {max_ejection_percent: 50%}
    health_check: true
    circuit_breaker: {failure_ratio: 50%}
    retry: {budget: 20%}
routes:
  - name: api
    upstream: api
    cache: true
"""


def test_gateway_check_accepts_the_issue_spellings(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(SPELLINGS)
    p = gateway_cli("check", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "configuration OK" in p.stdout
