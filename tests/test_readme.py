"""The README's Python snippets run as written (so the API tour stays true)."""
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _snippets():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert _snippets()


@pytest.mark.parametrize("i", range(len(_snippets())))
def test_readme_snippet_runs(i):
    exec(compile(_snippets()[i], f"README.md snippet {i}", "exec"), {"__name__": "__readme__"})
