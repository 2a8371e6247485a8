"""Assignment 3, "What does fine-tuning change?", through otter-grader: `otter assign` builds
it; otter grades the solution at full marks; the student version runs end to end in a Jupyter kernel
and scores zero; each mutant of the bug zoo loses its own question's points, and only those,
with its message. Oracles: otter's grader, and the mutants' declared question and message."""

import assignment_harness as harness
import pytest

NAME = "what_finetuning_changes"
MUTANTS = harness.mutants(NAME)
CROSS_CHECKED = (
    "checkpoint_without_input_grads"  # also graded by otter itself, to pin the fast grader
)


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
