"""Load a YAML configuration file into the frozen model, with `file:line: key: message` errors.

The YAML is composed to nodes first so that each key path remembers the line it was written on;
an error raised for `routes[2].upstream` is then reported at that key's line. Once the model is
built, the files it names are checked (gateway.config.checks), reported the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.config import checks
from gateway.config.model import Config
from gateway.config.schema import ConfigError, Issue, build


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mapping keys stay the text written: YAML 1.1 reads a key `on:` as True."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for knode, vnode in node.value:
        key = knode.value if isinstance(knode, yaml.ScalarNode) else loader.construct_object(knode, deep=True)
        out[key] = loader.construct_object(vnode, deep=deep)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _walk(node: yaml.Node, data: Any, path: str, lines: dict[str, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        for knode, vnode in node.value:
            key = str(knode.value)
            sub = f"{path}.{key}" if path else key
            lines[sub] = knode.start_mark.line + 1
            if key in data:
                _walk(vnode, data[key], sub, lines)
    elif isinstance(node, yaml.SequenceNode) and isinstance(data, list):
        for i, (vnode, item) in enumerate(zip(node.value, data, strict=False)):
            _walk(vnode, item, f"{path}[{i}]", lines)


def _line_for(path: str, lines: dict[str, int]) -> int:
    """The line of the deepest key path we know that is a prefix of `path`."""
    probe = path
    while probe:
        if probe in lines:
            return lines[probe]
        cut = max(probe.rfind("."), probe.rfind("["))
        probe = probe[:cut] if cut > 0 else ""
    return lines.get("", 1)


def load_text(text: str, filename: str = "<config>") -> Config:
    """Parse and validate configuration text; raises ConfigError with every message formatted."""
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else 1
        raise ConfigError([f"{filename}:{line}: YAML syntax error: {e.problem}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{filename}:1: YAML error: {e}"]) from None
    lines: dict[str, int] = {}
    if node is not None:
        _walk(node, data, "", lines)
    if data is None:
        data = {}

    def located(e: Issue) -> tuple[int, str]:
        line = _line_for(e.path, lines)
        return line, f"{filename}:{line}: {e.path or '(top level)'}: {e.message}"

    try:
        config: Config = build(Config, data, "")
    except Issue as e:
        raise ConfigError([located(e)[1]]) from None
    issues = sorted((located(e) for e in checks.check(config)), key=lambda item: item[0])
    if issues:
        raise ConfigError([message for _, message in issues])
    return config


def load_file(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read configuration: {e.strerror}"]) from None
    return load_text(text, str(p))
