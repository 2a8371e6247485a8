"""mkdocs hooks for lowrank's site: notebooks, commands run at build time, a whole API reference.

1. The eight notebooks in `notebooks/` become pages `notebooks/NN_name.ipynb` (mkdocs-jupyter
   executes and renders them). They run in smoke mode with static widget panels (a built site
   has no kernel): LOWRANK_SMOKE=1 and LOWRANK_STATIC=1 unless the builder set them.
2. A line `<!-- run: lowrank claims bits -->` is replaced by the command and its real output,
   captured now; `<!-- run-smoke: CMD -->` runs `CMD --smoke` in smoke mode and CMD otherwise.
   A command that fails fails the build. Pages with such output say how they were built.
3. After the pages are read, every public module of lowrank must appear in a `::: module` line
   of `docs/reference/`, and every name in a module's `__all__` must have a docstring
   (mkdocstrings leaves undocumented names out silently): otherwise the build fails.
"""

import importlib
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RUN = re.compile(r"^<!-- (run|run-smoke): (.+?) -->$", re.MULTILINE)
AUTODOC = re.compile(r"^\s*::: ([\w.]+)\s*$", re.MULTILINE)
PACKAGES = {"lowrank", "lowrank.numpy", "lowrank.torch", "lowrank.commands", "lowrank.checks"}
_outputs: dict[str, str] = {}  # command -> its output, so a command shown twice runs once


def _smoke() -> bool:
    return os.environ.get("LOWRANK_SMOKE", "1") not in ("", "0")


def on_config(config):
    os.environ.setdefault("LOWRANK_SMOKE", "1")
    os.environ.setdefault("LOWRANK_STATIC", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # The notebooks' kernel must draw inline figures even when the builder runs under pytest,
    # whose conftest sets the Agg backend (which shows nothing).
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return config


@event_priority(100)  # before mkdocs-jupyter wraps .ipynb files into notebook pages
def on_files(files, config):
    # the notebooks as pages, and the committed benchmark plots (docs/benchmarks.md shows them)
    found = sorted((ROOT / "notebooks").glob("*.ipynb"))
    found += sorted((ROOT / "benchmarks" / "results").glob("*.png"))
    for path in found:
        files.append(
            File(
                path.relative_to(ROOT).as_posix(),
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def _run(command: str) -> str:
    """Run a documented command from the repository root; its stdout, or fail the build."""
    if command in _outputs:
        return _outputs[command]
    argv = shlex.split(command)
    if argv[0] == "lowrank":  # the venv's lowrank, whether or not its bin/ is on PATH
        argv = [sys.executable, "-m", "lowrank", *argv[1:]]
    elif argv[0] == "python":  # an example script, run by the Python building the site
        argv = [sys.executable, *argv[1:]]
    env = dict(os.environ, MPLBACKEND="Agg", COLUMNS="100")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise PluginError(
            f"documented command failed (exit {done.returncode}): {command}\n{done.stderr[-3000:]}"
        )
    _outputs[command] = done.stdout.rstrip()
    return _outputs[command]


def on_page_markdown(markdown, page, config, files):
    if not RUN.search(markdown):
        return markdown

    def replace(match: re.Match) -> str:
        command = match.group(2)
        if match.group(1) == "run-smoke" and _smoke():
            command += " --smoke"
        return f"```console\n$ {command}\n{_run(command)}\n```"

    markdown = RUN.sub(replace, markdown)
    mode = (
        "in smoke mode (`LOWRANK_SMOKE=1`): commands shown with `--smoke` ran at small sizes, "
        "so their numbers are noisier than a full run's; build with `LOWRANK_SMOKE=0` for full size"
        if _smoke()
        else "at full size (`LOWRANK_SMOKE=0`)"
    )
    note = (
        '!!! info "Outputs on this page"\n    Every command output below was captured when this '
        f"site was built, {mode}.\n\n"
    )
    heading, _, body = markdown.partition("\n")
    return f"{heading}\n\n{note}{body}" if heading.startswith("# ") else note + markdown


def _public_modules() -> list[str]:
    import lowrank

    names = []
    for info in pkgutil.walk_packages(lowrank.__path__, "lowrank."):
        parts = info.name.split(".")[1:]
        if info.name not in PACKAGES and not any(part.startswith("_") for part in parts):
            names.append(info.name)
    return names


def on_env(env, config, files):
    """Fail the build when the reference misses a module or a public name has no docstring."""
    documented = set()
    for file in files.documentation_pages():
        if file.src_uri.startswith("reference/"):
            documented.update(AUTODOC.findall(Path(file.abs_src_path).read_text()))
    problems = []
    for name in _public_modules():
        if name not in documented:
            problems.append(f"module {name} has no `::: {name}` in docs/reference/")
        module = importlib.import_module(name)
        if not hasattr(module, "__all__"):
            problems.append(f"{name} does not declare __all__")
            continue
        for member in module.__all__:
            if not getattr(getattr(module, member), "__doc__", None):
                problems.append(f"{name}.{member} has no docstring")
    if problems:
        raise PluginError("API reference incomplete:\n  " + "\n  ".join(problems))
    return env
