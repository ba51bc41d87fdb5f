"""extras/exercises.py: the markers agree with the mapping to tests, the student copy has each
region stubbed, and on that copy exactly the mapped tests fail (slow: pytest in a subprocess)."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT
from extras import exercises
from extras.exercises import HINTS, TESTS, ExerciseError, find_regions, write_student_copy

WHERE = {1: [("data.py", "collate")], 2: [("dpop.py", "sequence_logps"), ("dpop.py", "token_logps")],
         3: [("dpop.py", "dpop_loss")], 4: [("dpop.py", "preference_metrics")], 5: [("train.py", "train")]}
GONE = {1: "mask[i, len(prompt) - 1:n] = True", 2: "gather(-1, targets.unsqueeze(-1))",
        3: "penalty = torch.relu(-chosen_logratios)", 4: 'metrics["logratio/chosen"] = (chosen_rewards / beta)',
        5: "scaler.scale(loss / cfg.grad_accum).backward()"}


def test_markers_agree_with_the_mapping_to_tests():
    regions = exercises.all_regions(ROOT, exercises.source_files(ROOT))
    assert {n: [(r.path, r.function) for r in regions if r.number == n] for n in WHERE} == WHERE
    assert len(regions) == sum(map(len, WHERE.values()))
    assert set(HINTS) == set(TESTS) == set(WHERE)
    for node in (node for nodes in TESTS.values() for node in nodes):  # each names a real test
        path, name = node.split("::")
        with open(os.path.join(ROOT, path)) as f:
            assert f"\ndef {name.split('[')[0]}(" in f.read(), node


def test_the_student_copy_stubs_each_region_and_nothing_else(tmp_path):
    out = tmp_path / "student"
    write_student_copy(str(out))
    sheet = (out / "EXERCISES.md").read_text()
    for n, places in WHERE.items():
        for path, function in places:
            code = (out / path).read_text()
            compile(code, path, "exec")
            assert f'raise NotImplementedError("exercise {n}: {HINTS[n]}")' in code and GONE[n] not in code
            assert f"in `{function}`" in sheet and exercises.grading_command(n) in sheet
    for path in ("model.py", "tests/test_dpop.py", "extras/checkpoints.py", "assets/experiment.png"):
        assert (out / path).read_bytes() == open(os.path.join(ROOT, path), "rb").read()
    assert not (out / ".git").exists()


def test_bad_input_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "student"
    out.mkdir()
    (out / "mine.py").write_text("a student's work\n")
    assert exercises.main([str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} exists and is not an empty folder") and err.count("\n") == 1
    assert (out / "mine.py").read_text() == "a student's work\n"

    lines = ["def f():", "    # exercise 1 begins: a title", "    return 1"]
    with pytest.raises(ExerciseError, match=r"^x.py:2: exercise 1 begins but never ends"):
        find_regions("x.py", lines)
    with pytest.raises(ExerciseError, match=r"^x.py:4: exercise 2 ends, but exercise 1 began \(line 2\)"):
        find_regions("x.py", lines + ["    # exercise 2 ends"])
    with pytest.raises(ExerciseError, match=r"^x.py:2: exercise 1 marks no code"):
        find_regions("x.py", lines[:2] + ["", "    # exercise 1 ends"])
    [region] = find_regions("x.py", lines + ["    # exercise 1 ends"])
    assert (region.number, region.title, region.function, region.begin, region.end) == (1, "a title", "f", 2, 4)


def outcomes(folder, node_ids, report):
    """Run pytest on node_ids in folder; {node id: "passed", "failed" or "skipped"}."""
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                    *node_ids], cwd=folder, capture_output=True, timeout=300)
    found = {}
    for case in ET.parse(report).iter("testcase"):
        node = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        tags = {child.tag for child in case}
        found[node] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
    return found


@pytest.mark.slow  # pytest in subprocesses, on copies of the repo
def test_on_the_student_copy_exactly_the_mapped_tests_fail(tmp_path):
    """All stubs in: the mapped tests fail, the other tests of test_dpop.py and test_data.py pass."""
    out = tmp_path / "student"
    write_student_copy(str(out))
    mapped = {node for nodes in TESTS.values() for node in nodes}
    found = outcomes(out, ["tests/test_dpop.py", "tests/test_data.py", *sorted(mapped)], tmp_path / "all.xml")
    assert mapped <= found.keys() and len(found) > 30
    assert {node for node, outcome in found.items() if outcome == "failed"} == mapped


@pytest.mark.slow
def test_each_exercise_passes_once_it_and_those_before_it_are_written(tmp_path):
    """Exercise n solved (the real code) and those after it stubbed: its tests pass. (The last
    one's copy is the real repo, whose tests the fast subset runs, and the slowest: it trains.)"""
    for n in sorted(TESTS)[:-1]:
        out = tmp_path / f"solved{n}"
        write_student_copy(str(out), numbers={m for m in TESTS if m > n})
        found = outcomes(out, TESTS[n], tmp_path / f"solved{n}.xml")
        assert found == {node: "passed" for node in TESTS[n]}, n


def test_the_student_copy_holds_no_answers(tmp_path):
    """The homework's key is not copied; the lesson's answers and the README's note on exercise
    3 are replaced by one line; the same files keep everything else."""
    if not os.path.exists(os.path.join(ROOT, "extras", "homework_key.py")):
        pytest.skip("this is a student copy: its answers were left out when it was written")
    out = tmp_path / "student"
    write_student_copy(str(out))
    assert not (out / "extras" / "homework_key.py").exists()
    note = "*(The answers are left out of the student copy: your teacher has them.)*"
    for path, gone, kept in (("docs/lesson.md", "- **Q6.**", "## Answers"),
                             ("README.md", "clamp(-c, min=0)", "## Decisions worth knowing")):
        text, real = (out / path).read_text(), open(os.path.join(ROOT, path)).read()
        assert gone in real and gone not in text and kept in text and note in text
        assert exercises.ANSWERS_BEGIN not in text and len(text) < len(real)
    lines = ["a", exercises.ANSWERS_BEGIN, "answer"]
    with pytest.raises(ExerciseError, match=r"^x.md:2: <!-- answers begin --> never ends"):
        exercises.without_answers(lines, "x.md")
    assert exercises.without_answers(lines + [exercises.ANSWERS_END, "b"], "x.md") == ["a", note, "b"]


def test_first_k_takes_out_only_the_first_k(tmp_path, capsys):
    """--first 2: exercises 1 and 2 are stubbed, 3 to 5 keep the real code, and the sheet lists
    the first two only; a K out of range is one error line."""
    out = tmp_path / "student"
    assert exercises.main([str(out), "--first", "2"]) == 0
    assert "the repo with 2 exercises to write (1, 2)" in capsys.readouterr().out
    for n, places in WHERE.items():
        for path, _ in places:
            assert (GONE[n] in (out / path).read_text()) == (n > 2), n
    sheet = (out / "EXERCISES.md").read_text()
    assert "## 2." in sheet and "## 3." not in sheet
    with pytest.raises(SystemExit):
        exercises.main([str(tmp_path / "other"), "--first", "6"])
    assert "--first 6: choose 1 to 5" in capsys.readouterr().err


def test_an_exercise_not_written_yet_is_one_error_line(capsys):
    """In a student copy a command that reaches a stub ends with one line that says where the
    exercise is and what it asks, not a traceback; any other NotImplementedError is left alone."""
    from extras.stopping import one_line_errors

    def stub():
        raise NotImplementedError("exercise 1: set mask to True")
    with pytest.raises(SystemExit) as done:
        with one_line_errors():
            stub()
    message = str(done.value.code)
    assert message.startswith("error: ") and "test_exercises.py:" in message  # where the stub is
    assert ", in stub: exercise 1: set mask to True; write it (EXERCISES.md)" in message and "\n" not in message
    with pytest.raises(NotImplementedError, match="something else"):
        with one_line_errors():
            raise NotImplementedError("something else")
