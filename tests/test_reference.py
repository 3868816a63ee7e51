"""The README's configuration reference is generated from the model and must not drift."""

from __future__ import annotations

from pathlib import Path

from gateway.config.reference import BEGIN, END, embed


def test_readme_reference_is_current() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert BEGIN in readme and END in readme
    assert embed(readme) == readme, "run: python -m gateway.config.reference --write"


def test_every_shipped_example_config_is_valid() -> None:
    from gateway.config.parse import load_file

    for path in (Path(__file__).resolve().parents[1] / "config").glob("*.yaml"):
        load_file(path)
