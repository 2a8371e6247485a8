"""The classroom assignments' conventions, checked on the committed files (building and grading
them is the other files' job): each master notebook is clean and in otter's format, each bug zoo
is documented mutant by mutant, the zoo holds every mistake issue 11 names, and every notebook
exercise has a written solution. Oracles: the files themselves, read independently."""

import json
import re

import assignment_harness as harness
import pytest

NAMES = ("lora_from_scratch", "nf4_by_hand", "what_finetuning_changes")
NOTEBOOKS = sorted((harness.ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = harness.ASSIGNMENTS / "notebook_solutions"

# The mistakes the issue lists, and the mutant that is each one.
ISSUE_MISTAKES = {
    "wrong shape": ("lora_from_scratch", "forward_column_vectors"),
    "alpha instead of alpha/r": ("lora_from_scratch", "scale_alpha_not_over_r"),
    "B not zero at start": ("lora_from_scratch", "init_b_random"),
    "a gradient off by a transpose": ("lora_from_scratch", "backward_dB_transposed"),
    "a merge done in low precision": ("lora_from_scratch", "merge_in_float16"),
    "ties broken the wrong way": ("nf4_by_hand", "ties_round_up"),
    "nibbles in the wrong order": ("nf4_by_hand", "nibbles_low_first"),
    "per-tensor instead of per-block absmax": ("nf4_by_hand", "absmax_per_tensor"),
    "double quantization applied twice": ("nf4_by_hand", "double_quant_twice"),
    "gradient checkpointing without input gradients": (
        "what_finetuning_changes",
        "checkpoint_without_input_grads",
    ),
    "a mean-of-means loss under gradient accumulation": (
        "what_finetuning_changes",
        "accumulation_mean_of_means",
    ),
}


def master(name):
    return json.loads((harness.ASSIGNMENTS / name / f"{name}.ipynb").read_text(encoding="utf-8"))


def questions(name):
    return [
        re.search(r"name:\s*(\w+)", "".join(cell["source"]))[1]
        for cell in master(name)["cells"]
        if cell["cell_type"] == "raw" and "".join(cell["source"]).startswith("# BEGIN QUESTION")
    ]


@pytest.mark.parametrize("name", NAMES)
def test_master_notebook_is_clean_and_in_otter_format(name):
    cells = master(name)["cells"]
    config = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "raw" and config.startswith("# ASSIGNMENT CONFIG")
    assert f"name: {name}" in config
    intro = "".join(cells[1]["source"])
    assert "What you will learn" in intro and "What it needs" in intro and "arXiv" in intro
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    for cell in code:  # committed without outputs
        assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])
    source = "\n".join("".join(cell["source"]) for cell in code)
    assert 'SMOKE = os.environ.get("LOWRANK_SMOKE") == "1"' in source
    assert "STUDENT_ID = " in source and "checks.is_implemented(" in source
    assert len(questions(name)) >= 5


@pytest.mark.parametrize("name", NAMES)
def test_every_mutant_is_documented_and_replaces_a_solution_function(name):
    mutants = harness.mutants(name)
    readme = (harness.ASSIGNMENTS / name / "mutants" / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)\.py` \| (\w+) \|", readme, flags=re.MULTILINE))
    assert rows == {m.name: m.question for m in mutants}
    cells = harness.code_cells(harness.ASSIGNMENTS / name / f"{name}.ipynb")
    for mutant in mutants:
        assert mutant.question in questions(name), mutant.name
        assert mutant.mistake and mutant.message, mutant.name
        assert harness.apply_mutant(cells, mutant) != cells  # exactly one cell defines it
    covered = {m.question for m in mutants}
    assert covered == set(questions(name)), "every question has at least one mutant"


def test_the_zoo_holds_every_mistake_the_issue_names():
    for mistake, (name, mutant) in ISSUE_MISTAKES.items():
        assert mutant in {m.name for m in harness.mutants(name)}, mistake


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_every_notebook_exercise_has_a_solution(notebook):
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    exercises = re.findall(r"^(\d)\. \*\*", "".join(cells[-1]["source"]), flags=re.MULTILINE)
    exercises = exercises or re.findall(r"^(\d)\. ", "".join(cells[-1]["source"]), re.MULTILINE)
    solution = (SOLUTIONS / f"{notebook.stem}.md").read_text(encoding="utf-8")
    assert notebook.name in solution
    for number in exercises:
        assert re.search(rf"^## Exercise {number}\b", solution, flags=re.MULTILINE), number
    assert len(exercises) == 3


def test_solutions_are_not_linked_from_student_facing_pages():
    for page in [harness.ROOT / "README.md", *sorted((harness.ROOT / "docs").rglob("*.md"))]:
        if page.name != "instructors.md":
            assert "notebook_solutions" not in page.read_text(encoding="utf-8"), page.name
