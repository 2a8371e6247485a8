"""Grade a folder of submitted notebooks with an assignment's autograder, without Docker, and
write one CSV row per submission: file, STUDENT_ID, each question's score, total.

    python assignments/grade_folder.py assignments/nf4_by_hand/dist/autograder/*.zip \
        submissions/ --out grades.csv

Each submission is a notebook (.ipynb) or the zip that the notebook's export cell wrote. Grading
runs otter's own non-containerised grader (`otter.api.grade_submission`: a fresh Jupyter kernel
per submission, in this Python environment, which must have lowrank and the assignment's
requirements installed). The kernels run with LOWRANK_SMOKE=1 unless --full is given: that
shrinks only the ungraded demonstration cells (training runs, plots), never a graded answer or
test. The STUDENT_ID column is what the submission declares: check it against who submitted,
because it seeds the hidden tests. See docs/instructors.md.
"""

import argparse
import csv
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

STUDENT_ID = re.compile(r"""^STUDENT_ID\s*=\s*["'](.*)["']""", re.MULTILINE)


def student_id(notebook: Path) -> str:
    """The STUDENT_ID a notebook assigns ("" if none)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            found = STUDENT_ID.search("".join(cell["source"]))
            if found:
                return found[1]
    return ""


def notebook_of(submission: Path, scratch: Path) -> Path:
    """The notebook of a submission: itself, or the one .ipynb inside an exported zip."""
    if submission.suffix != ".zip":
        return submission
    with zipfile.ZipFile(submission) as archive:
        names = [n for n in archive.namelist() if n.endswith(".ipynb") and "/." not in n]
        if len(names) != 1:
            raise ValueError(f"{submission}: expected one notebook in the zip, found {names}")
        target = scratch / submission.stem
        archive.extract(names[0], target)
        return target / names[0]


def grade_folder(autograder: Path, folder: Path) -> list[dict[str, object]]:
    """One row per submission in `folder` (sorted by name)."""
    from otter.api import grade_submission

    rows = []
    submissions = sorted(p for p in folder.iterdir() if p.suffix in (".ipynb", ".zip"))
    if not submissions:
        raise ValueError(f"no .ipynb or .zip submissions in {folder}")
    with tempfile.TemporaryDirectory() as scratch:
        for submission in submissions:
            notebook = notebook_of(submission, Path(scratch))
            results = grade_submission(str(notebook), str(autograder), quiet=True)
            row: dict[str, object] = {"file": submission.name, "student_id": student_id(notebook)}
            for question, test_file in sorted(results.results.items()):
                row[question] = test_file.score
            row["total"] = results.total
            row["possible"] = results.possible
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("autograder", type=Path, help="the autograder zip from `otter assign`")
    parser.add_argument("folder", type=Path, help="a folder of .ipynb or exported .zip files")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"), help="CSV to write")
    parser.add_argument("--full", action="store_true", help="run demonstration cells full size")
    args = parser.parse_args(argv)
    if not args.autograder.is_file() or args.autograder.suffix != ".zip":
        parser.error(f"{args.autograder} is not an autograder zip")
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if not args.full:
        os.environ["LOWRANK_SMOKE"] = "1"  # inherited by the grading kernels
    rows = grade_folder(args.autograder, args.folder)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['file']}: {row['total']} / {row['possible']} ({row['student_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
