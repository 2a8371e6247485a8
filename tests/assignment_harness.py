"""Build, run and grade the classroom assignments in `assignments/` (shared by the tests in
tests/assignments/; docs/instructors.md explains the assignments themselves).

- `build`: `otter assign` on the master notebook, into a temporary folder: the student notebook,
  the autograder notebook (the solution) and the autograder zip, whose tests/ are unpacked.
- `grade_with_otter`: otter's own non-containerised grading of a notebook (`otter run`'s API:
  a fresh Jupyter kernel runs the notebook, then otter's grader scores it).
- `grade_in_process`: the same grading rule without a kernel, so that dozens of mutants grade
  in seconds: the notebook's code cells run in order in one namespace, errors are recorded and
  execution goes on (otter ignores errors too), and at each `grader.check("q")` cell the
  question's test file from the autograder zip runs there and then through otter's own test
  runner (`OKTestFile`), as otter's grading does; questions never checked run at the end.
  The tests check that it gives otter's scores on the solution and on a mutant.
- `mutants` / `apply_mutant`: a mutant is a file `assignments/<name>/mutants/<mutant>.py` whose
  docstring names one real mistake, with `QUESTION` (the question it must fail) and `MESSAGE`
  (words its failure message must contain), and one function: that function replaces the
  solution's function of the same name in the master notebook's solution cell.
"""

import ast
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = ROOT / "assignments"
CHECK_CELL = re.compile(r'grader\.check\("(\w+)"\)')


@dataclass(frozen=True)
class Built:
    """The outputs of `otter assign` for one assignment."""

    name: str
    student: Path  # the notebook students get (solutions stripped, public tests only)
    solution: Path  # the autograder's notebook: the master with its solutions
    autograder: Path  # the autograder zip
    tests: Path  # its tests/ folder, unpacked: one OK-format file per question


def build(name: str, out: Path) -> Built:
    """`otter assign` the master notebook of `name` into `out`/dist (its tests are run by the
    caller, through `grade_with_otter`: hence --no-run-tests)."""
    master = ASSIGNMENTS / name / f"{name}.ipynb"
    dist = out / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "otter", "assign", "--no-run-tests", str(master), str(dist)],
        cwd=master.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"otter assign failed:\n{done.stdout}\n{done.stderr}"
    (autograder,) = (dist / "autograder").glob("*.zip")
    with zipfile.ZipFile(autograder) as archive:
        archive.extractall(out / "unpacked")
    return Built(
        name=name,
        student=dist / "student" / f"{name}.ipynb",
        solution=dist / "autograder" / f"{name}.ipynb",
        autograder=autograder,
        tests=out / "unpacked" / "tests",
    )


@dataclass
class Grade:
    """Per question: (score, possible) and the text of every failed test case."""

    scores: dict[str, tuple[float, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # cells that raised, "cell i: Error: ..."

    def full(self, question: str) -> bool:
        score, possible = self.scores[question]
        return score == possible

    @property
    def total(self) -> tuple[float, float]:
        return (sum(s for s, _ in self.scores.values()), sum(p for _, p in self.scores.values()))


def grade_with_otter(notebook: Path, built: Built) -> Grade:
    """Grade `notebook` with otter's API (a fresh kernel, otter's grader)."""
    from otter.api import grade_submission

    results = grade_submission(str(notebook), str(built.autograder), quiet=True)
    grade = Grade()
    for question, test_file in results.results.items():
        grade.scores[question] = (float(test_file.score), float(test_file.possible))
        grade.failures[question] = _failures(test_file)
    return grade


def _failures(test_file) -> str:
    return "\n".join(r.message for r in test_file.test_case_results if not r.passed)


def code_cells(notebook: Path) -> list[str]:
    """The sources of a notebook's code cells, in order."""
    nb = nbformat.read(notebook, as_version=4)
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def grade_in_process(cells: list[str], tests: Path, *, stop_after_checks: bool = False) -> Grade:
    """Run `cells` in one namespace and grade them with the test files in `tests` (see the
    module docstring for why this is otter's rule). With `stop_after_checks`, cells after the
    last `grader.check` are not run: once every question has been checked no later cell can
    change a score (otter's final pass only runs tests not yet run), so the grade is the same."""
    from otter.test_files import OKTestFile

    namespace: dict = {"__name__": "__main__"}
    grade = Grade()

    def run_tests(question: str) -> None:
        test_file = OKTestFile.from_file(str(tests / f"{question}.py"))
        test_file.run(namespace)
        grade.scores[question] = (float(test_file.score), float(test_file.possible))
        grade.failures[question] = _failures(test_file)

    last = max(i for i, source in enumerate(cells) if CHECK_CELL.fullmatch(source.strip()))
    for i, source in enumerate(cells):
        if stop_after_checks and i > last and len(grade.scores) == len(list(tests.glob("*.py"))):
            break
        check = CHECK_CELL.fullmatch(source.strip())
        if check:
            if check[1] not in grade.scores:
                run_tests(check[1])
        elif "otter.Notebook(" in source or "grader.export(" in source:
            continue  # otter's own cells: the grader is this function
        else:
            try:
                exec(compile(source, f"<cell {i}>", "exec"), namespace)
            except Exception as error:  # otter grades a notebook whose cells raise, too
                grade.errors.append(f"cell {i}: {type(error).__name__}: {error}")
    for path in sorted(tests.glob("*.py")):
        if path.stem not in grade.scores:
            run_tests(path.stem)
    return grade


def execute(notebook: Path, timeout: int = 600) -> None:
    """Run every cell of `notebook` in a fresh Jupyter kernel, in its folder; raise on the first
    cell that fails (nbclient's CellExecutionError)."""
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(notebook.parent)}},
    )
    client.execute()


@dataclass(frozen=True)
class Mutant:
    """One real mistake, as a replacement of one solution function."""

    name: str
    mistake: str  # the docstring's first paragraph
    question: str  # the question whose points it must lose (and no other's)
    message: str  # words the failure message must contain
    function: str  # the name of the solution function it replaces
    source: str  # the replacement's source


def mutants(name: str) -> list[Mutant]:
    """The mutants of assignment `name`, sorted by file name."""
    found = []
    for path in sorted((ASSIGNMENTS / name / "mutants").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        constants = {
            node.targets[0].id: ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        }
        (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        found.append(
            Mutant(
                name=path.stem,
                mistake=" ".join(ast.get_docstring(tree).split("\n\n")[0].split()),
                question=constants["QUESTION"],
                message=constants["MESSAGE"],
                function=function.name,
                source=ast.get_source_segment(text, function),
            )
        )
    return found


def apply_mutant(cells: list[str], mutant: Mutant) -> list[str]:
    """`cells` with the function `mutant.function` replaced by the mutant's (exactly one cell
    must define it at top level)."""
    changed = list(cells)
    hits = []
    for i, source in enumerate(cells):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == mutant.function:
                hits.append((i, node))
    assert len(hits) == 1, f"{mutant.name}: {len(hits)} cells define {mutant.function}"
    i, node = hits[0]
    lines = cells[i].splitlines()
    start = node.lineno - 1 - len(node.decorator_list)
    changed[i] = "\n".join(lines[:start] + mutant.source.splitlines() + lines[node.end_lineno :])
    return changed


def write_mutated(notebook: Path, mutant: Mutant, path: Path) -> Path:
    """The notebook `notebook` with `mutant` applied, written to `path` (for otter to grade)."""
    nb = nbformat.read(notebook, as_version=4)
    cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell, source in zip(cells, apply_mutant([c.source for c in cells], mutant), strict=True):
        cell.source = source
    nbformat.write(nb, path)
    return path


def solution_lines(name: str) -> list[str]:
    """The master notebook's solution code: lines inside BEGIN/END SOLUTION and lines marked
    `# SOLUTION` (the ones `otter assign` must strip from the student version)."""
    lines, inside = [], False
    nb = nbformat.read(ASSIGNMENTS / name / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            marker = line.strip()
            if marker == "# BEGIN SOLUTION":
                inside = True
            elif marker == "# END SOLUTION":
                inside = False
            elif inside or marker.endswith("# SOLUTION"):
                lines.append(marker.removesuffix("# SOLUTION").strip())
    return [line for line in lines if len(line) > 12]


def assert_student_version(built: Built) -> None:
    """No solution line and no hidden test reaches the student notebook; its public tests
    do, and every question has a grader.check cell."""
    student = built.student.read_text(encoding="utf-8")
    code = "\n".join(code_cells(built.student))
    leaked = [line for line in solution_lines(built.name) if line in code]
    assert not leaked, f"solution lines in the student notebook's code: {leaked[:3]}"
    assert "student_id=STUDENT_ID" not in student, "a hidden test reached the student notebook"
    nb = nbformat.read(built.student, as_version=4)
    public = nb.metadata["otter"]["tests"]
    questions = sorted(path.stem for path in built.tests.glob("*.py"))
    assert sorted(public) == questions
    for question, test in public.items():
        cases = test["suites"][0]["cases"]
        assert cases and not any(case["hidden"] for case in cases), question
    checks = [
        m[1] for source in code_cells(built.student) if (m := CHECK_CELL.fullmatch(source.strip()))
    ]
    assert checks == questions


def assert_mutant_caught(grade: Grade, mutant: Mutant) -> None:
    """The mutant loses points on its own question, keeps every other question's, and its
    question's failure text carries the mutant's message."""
    lost = sorted(q for q in grade.scores if not grade.full(q))
    assert lost == [mutant.question], (
        f"{mutant.name}: lost points on {lost}, expected [{mutant.question}]"
    )
    assert mutant.message in grade.failures[mutant.question], (
        f"{mutant.name}: {mutant.message!r} not in the failure message:\n"
        f"{grade.failures[mutant.question][-3000:]}"
    )
