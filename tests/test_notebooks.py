"""The notebooks' conventions, checked on the committed files (running them is nbmake's job):
committed without outputs, numbered 01-08, each opening with what it teaches and needs, using
the library rather than copies of it, honouring LOWRANK_SMOKE, and ending with exercises."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_eight_numbered_notebooks():
    assert [path.name[:3] for path in NOTEBOOKS] == [f"0{i}_" for i in range(1, 9)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_clean_and_complete(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    cells = notebook["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    for cell in code:  # nbstripout-clean: diffs show code, not outputs
        assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])
    intro = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown"
    assert "What you will learn" in intro and "What it needs" in intro
    source = "\n".join("".join(cell["source"]) for cell in code)
    assert "from lowrank" in source or "import lowrank" in source
    assert 'SMOKE = os.environ.get("LOWRANK_SMOKE") == "1"' in source
    assert "assert " in source  # every notebook checks what it shows
    assert "## Exercises" in "".join(cells[-1]["source"])
