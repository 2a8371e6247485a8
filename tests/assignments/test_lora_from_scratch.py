"""Assignment 1, LoRA from scratch (NumPy), through otter-grader: `otter assign` builds it; otter
grades the solution at full marks; the student version runs end to end in a Jupyter kernel
and scores zero; each mutant of the bug zoo loses its own question's points, and only those,
with its message. Oracles: otter's grader, and the mutants' declared question and message."""

import csv
import shutil
import subprocess
import sys

import assignment_harness as harness
import pytest

NAME = "lora_from_scratch"
MUTANTS = harness.mutants(NAME)
CROSS_CHECKED = "backward_dB_transposed"  # also graded by otter itself, to pin the fast grader


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return harness.build(NAME, tmp_path_factory.mktemp(NAME))


@pytest.fixture(scope="module")
def solution(built):
    return harness.code_cells(built.solution)


def test_student_version_has_no_solutions_and_no_hidden_tests(built):
    harness.assert_student_version(built)


def test_otter_gives_the_solution_full_marks_and_the_fast_grader_agrees(built, solution):
    by_otter = harness.grade_with_otter(built.solution, built)
    assert by_otter.total[0] == by_otter.total[1] > 0, by_otter.failures
    in_process = harness.grade_in_process(solution, built.tests)
    assert in_process.scores == by_otter.scores and not in_process.errors


def test_student_version_runs_end_to_end_and_scores_zero(built):
    harness.execute(built.student)  # raises on the first cell that fails
    grade = harness.grade_in_process(harness.code_cells(built.student), built.tests)
    assert grade.total == (0.0, sum(p for _, p in grade.scores.values())) and not grade.errors


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_loses_its_question_and_only_that(built, solution, mutant):
    mutated = harness.apply_mutant(solution, mutant)
    harness.assert_mutant_caught(
        harness.grade_in_process(mutated, built.tests, stop_after_checks=True), mutant
    )


def test_otter_grades_a_mutant_as_the_fast_grader_does(built, tmp_path):
    mutant = next(m for m in MUTANTS if m.name == CROSS_CHECKED)
    by_otter = harness.grade_with_otter(
        harness.write_mutated(built.solution, mutant, tmp_path / f"{NAME}.ipynb"), built
    )
    harness.assert_mutant_caught(by_otter, mutant)


def test_grade_folder_script_grades_a_folder_of_submissions(built, tmp_path):
    folder = tmp_path / "submissions"
    folder.mkdir()
    shutil.copy(built.solution, folder / "solved.ipynb")
    shutil.copy(built.student, folder / "unfilled.ipynb")
    out = tmp_path / "grades.csv"
    script = harness.ASSIGNMENTS / "grade_folder.py"
    done = subprocess.run(
        [sys.executable, str(script), str(built.autograder), str(folder), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["file"]: row for row in csv.DictReader(out.open(encoding="utf-8"))}
    assert float(rows["solved.ipynb"]["total"]) == float(rows["solved.ipynb"]["possible"]) == 16
    assert float(rows["unfilled.ipynb"]["total"]) == 0
    assert {row["student_id"] for row in rows.values()} == {"ada.lovelace@example.edu"}
