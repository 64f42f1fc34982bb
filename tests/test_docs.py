"""Every ```python block in the README and docs/ runs (blocks of one file share a namespace)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_snippets_run(page, capsys):
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(_blocks(page)):
        try:
            exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, python block {i} failed: {e!r}") from e


def test_training_page_prints_what_it_says(capsys):
    namespace: dict = {}
    for block in _blocks(ROOT / "docs" / "training.md"):
        exec(block, namespace)
    out = capsys.readouterr().out.split("\n")
    assert out[0] == "0.0 0.01" and out[1] == "1 50 True"
    donation = out.index("step: state.params['0.weight'] was donated to a step built with "
                         "donate='state'")
    assert out[donation - 2:donation] == ["True", "True"]
