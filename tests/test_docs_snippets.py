"""The Python on the concept and how-to pages runs, and asserts what the page says.

Each page's ```python blocks run in order in one namespace (as a reader pastes them into one
session), in a fresh working directory, in a subprocess with the docs' environment
(LOWRANK_SMOKE=1, offline). A block right after a `<!-- no-run -->` line is shown, not run (for
the odd line that needs a GPU or a model folder the reader has and we do not).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs" / "concepts").glob("*.md")) + sorted(
    (ROOT / "docs" / "how-to").glob("*.md")
)
BLOCK = re.compile(r"(<!-- no-run -->\s*\n)?```python\n(.*?)```", re.DOTALL)

pytest.importorskip("torch")
pytest.importorskip("transformers")


def runnable_code(page: Path) -> str:
    """The page's runnable blocks, joined in order."""
    blocks = [code for skip, code in BLOCK.findall(page.read_text()) if not skip]
    return "\n\n".join(textwrap.dedent(code) for code in blocks)


@pytest.mark.parametrize("page", PAGES, ids=[f"{p.parent.name}/{p.name}" for p in PAGES])
def test_page_code_runs(page, tmp_path):
    code = runnable_code(page)
    if not code.strip():
        pytest.skip(f"{page.name} has no Python to run")
    script = tmp_path / "page.py"
    script.write_text(code)
    env = dict(os.environ, LOWRANK_SMOKE="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{page.relative_to(ROOT)} failed:\n{done.stderr[-4000:]}"


def test_there_are_pages_to_check():
    names = {page.parent.name for page in PAGES}
    assert names == {"concepts", "how-to"}, names
