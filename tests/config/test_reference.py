"""The configuration reference (docs/configuration.md) is generated from the model and must not drift."""

from __future__ import annotations

from gateway.config.reference import BEGIN, END, doc_path, embed
from tests.helpers import ROOT


def test_configuration_reference_is_current() -> None:
    doc = doc_path().read_text(encoding="utf-8")
    assert BEGIN in doc and END in doc
    assert embed(doc) == doc, "run: python -m gateway.config.reference --write"


def test_every_shipped_example_config_is_valid() -> None:
    from gateway.config.parse import load_file

    for path in (ROOT / "config").glob("*.yaml"):
        load_file(path)
