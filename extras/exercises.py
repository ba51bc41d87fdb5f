"""Exercises graded by the tests: a student copy of this repo with a few regions of code taken out.

    python extras/exercises.py /tmp/student             # write the copy, and /tmp/student/EXERCISES.md
    python extras/exercises.py /tmp/student --first 2   # only exercises 1 and 2 to write; 3-5 as they are
    cd /tmp/student && python -m pytest -q tests -k "collate_alignment or collate_on_built_in"

A teacher hands out the copy. In it, each marked region of the lesson files is replaced by a
`raise NotImplementedError("exercise N: <hint>")`; EXERCISES.md lists each exercise, where it
is, its hint and the command that runs the tests that grade it. The student writes the code
back until those tests pass. The exercises follow the reading order, and each one's tests need
only the exercises before it, so they are done in order. With --first K only exercises 1 to K are
taken out: once a class has written them, every lesson command runs, so the lesson can go on
while the later exercises wait for the next session.

The copy holds no answers: the teacher's files (TEACHER_ONLY: the homework's answer key) are not
copied, and the Markdown between the lines `<!-- answers begin -->` and `<!-- answers end -->`
(the lesson's answers, the README's note on exercise 3) is replaced by a line that says so.

The regions are marked in the real files by two comment lines, at the region's indentation (an
exercise may have several regions, each one stubbed):

    <indent># exercise <N> begins: <title>
    <indent># exercise <N> ends

so the copy is made from the code itself and there is no second version that can drift. Here
live what the markers leave out: the hint of each exercise (HINTS) and the tests that grade it
(TESTS); tests/test_exercises.py checks that the markers and these two agree, and that on the
copy exactly the mapped tests fail.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".git", ".venv", "out", "__pycache__"}  # never copied when the repo is not a git checkout
TEACHER_ONLY = {"extras/homework_key.py"}  # never copied: docs/homework.md's answer key
ANSWERS_BEGIN, ANSWERS_END = "<!-- answers begin -->", "<!-- answers end -->"  # in Markdown files
BEGIN = re.compile(r"^(\s*)# exercise (\d+) begins: (\S.*)$")
END = re.compile(r"^\s*# exercise (\d+) ends$")
DEF = re.compile(r"^\s*def (\w+)\(")

HINTS = {
    1: "set mask to True on row i's completion targets: targets[i, t] is seq[t+1] (see the worked example above)",
    2: "in sequence_logps, gather each target's log-prob from logps and sum it over the positions "
       "where mask is true, ignoring whatever the other positions hold (even NaN): (B,) float32; in "
       "token_logps, the same log-prob of each of N targets from its (N, V) logits, in float32, "
       "without a (N, V) log-softmax (log softmax(x)[t] = x[t] - logsumexp(x))",
    3: "return the (B,) DPOP losses of the module docstring from x.chosen_logratios (c) and "
       "x.rejected_logratios (r): the penalty max(0, -c) scaled by lam, inside the sigmoid; at c = 0 "
       "the penalty's gradient must be 0",
    4: "return the dict the docstring lists (batch means as Python floats); logratio/chosen and "
       "logratio/rejected are the rewards divided by beta, and they and penalty/active are left out "
       "when reference is False",
    5: "backward the micro-batch's loss through scaler.scale, scaled so that the grad_accum "
       "micro-batches' gradients add up to the gradient of their mean",
}

# The tests that grade each exercise (pytest node ids, relative to the repo root)
TESTS = {
    1: ["tests/test_data.py::test_collate_alignment_hand_written",
        "tests/test_data.py::test_collate_on_built_in_pairs_masks_exactly_the_completions",
        "tests/test_data.py::test_conversational_mask_covers_exactly_the_reply"],
    2: ["tests/test_dpop.py::test_sequence_logps_matches_naive_loop",
        "tests/test_dpop.py::test_sequence_logps_ignores_prompt_and_padding",
        "tests/test_dpop.py::test_sequence_logps_is_float32_for_half_inputs",
        "tests/test_speedups.py::test_completion_only_logits_equal_full_logits"],
    3: ["tests/test_dpop.py::test_policy_equal_to_reference[dpop]",
        "tests/test_dpop.py::test_closed_form_values",
        "tests/test_dpop.py::test_dpop_with_lam_zero_is_dpo",
        "tests/test_dpop.py::test_dpop_penalty_zero_at_or_above_reference_positive_below",
        "tests/test_dpop.py::test_dpop_gradient_weight_when_penalty_active",
        "tests/test_dpop.py::test_rewards_are_detached",
        "tests/test_dpop.py::test_the_worked_step_by_hand"],
    4: ["tests/test_dpop.py::test_preference_metrics"],
    5: ["tests/test_train.py::test_grad_accumulation_equals_one_big_batch"],
}


class ExerciseError(ValueError):
    """A marker out of place, or a copy that would overwrite something: one line, fit to print."""


class Region(NamedTuple):
    number: int
    title: str
    path: str      # relative to the repo root
    function: str  # the function the region is in
    begin: int     # the 1-based line numbers of its two markers
    end: int
    indent: str


# ---------------------------------------------------------------------------------------------
# Reading the markers

def source_files(root):
    """The files of the repo, relative to root: what git tracks, or (without git) every file but
    those under SKIP."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP)
            found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files)]
        return found


def find_regions(path, lines):
    """The regions marked in one file's lines. Raises ExerciseError "path:line: what is wrong"."""
    regions, open_at, defs = [], None, []  # defs: (indentation, name) of the enclosing functions
    for lineno, line in enumerate(lines, start=1):
        begin, end = BEGIN.match(line), END.match(line)
        code = line.strip()
        if code and not code.startswith("#"):
            indent = len(line) - len(line.lstrip())
            while defs and defs[-1][0] >= indent:  # back at a def's indentation: its body ended
                defs.pop()
            define = DEF.match(line)
            if define:
                defs.append((indent, define.group(1)))
        if begin:
            if open_at is not None:
                raise ExerciseError(f"{path}:{lineno}: exercise {begin.group(2)} begins inside exercise "
                                    f"{open_at[0].group(2)} (line {open_at[1]}), which has not ended")
            open_at = (begin, lineno, defs[-1][1] if defs else "(module level)")
        elif end:
            if open_at is None:
                raise ExerciseError(f"{path}:{lineno}: exercise {end.group(1)} ends but never began")
            opened, begin_line, function = open_at
            if end.group(1) != opened.group(2):
                raise ExerciseError(f"{path}:{lineno}: exercise {end.group(1)} ends, but exercise "
                                    f"{opened.group(2)} began (line {begin_line})")
            if not any(l.strip() for l in lines[begin_line:lineno - 1]):
                raise ExerciseError(f"{path}:{begin_line}: exercise {opened.group(2)} marks no code")
            regions.append(Region(int(opened.group(2)), opened.group(3), path, function,
                                  begin_line, lineno, opened.group(1)))
            open_at = None
    if open_at is not None:
        raise ExerciseError(f"{path}:{open_at[1]}: exercise {open_at[0].group(2)} begins but never ends "
                            f"(add a line '# exercise {open_at[0].group(2)} ends')")
    return regions


def all_regions(root, files):
    """Every region in the .py files, checked against HINTS and TESTS: each exercise marked at
    least once."""
    regions = []
    for path in files:
        if path.endswith(".py"):
            with open(os.path.join(root, path), encoding="utf-8") as f:
                regions += find_regions(path, f.read().splitlines())
    seen = {}
    for r in regions:
        if r.number not in HINTS or r.number not in TESTS:
            raise ExerciseError(f"{r.path}:{r.begin}: exercise {r.number} has no hint or no tests "
                                f"in extras/exercises.py (HINTS, TESTS)")
        seen[r.number] = r
    missing = sorted(set(HINTS) - set(seen))
    if missing:
        raise ExerciseError(f"exercise {missing[0]} is in extras/exercises.py but marked in no file")
    return sorted(regions, key=lambda r: (r.number, r.path, r.begin))


# ---------------------------------------------------------------------------------------------
# Writing the student copy

def stub(lines, regions):
    """lines with each region's code replaced by one raise at the region's indentation; the
    markers stay, to show the student where to write."""
    out, last = [], 0
    for r in sorted(regions, key=lambda r: r.begin):
        message = json.dumps(f"exercise {r.number}: {HINTS[r.number]}")  # a double-quoted literal
        out += lines[last:r.begin] + [f"{r.indent}raise NotImplementedError({message})"]
        last = r.end - 1  # the end marker is kept
    return out + lines[last:]


def grading_command(number):
    """The command that runs the tests of exercise number."""
    return "python -m pytest -q " + " ".join(f'"{t}"' for t in TESTS[number])


def without_answers(lines, path):
    """Markdown lines with each answers block (ANSWERS_BEGIN to ANSWERS_END) replaced by a note."""
    out, inside = [], None
    for lineno, line in enumerate(lines, start=1):
        if line.strip() == ANSWERS_BEGIN:
            inside = lineno
            out.append("*(The answers are left out of the student copy: your teacher has them.)*")
        elif line.strip() == ANSWERS_END:
            if inside is None:
                raise ExerciseError(f"{path}:{lineno}: {ANSWERS_END} without {ANSWERS_BEGIN}")
            inside = None
        elif inside is None:
            out.append(line)
    if inside is not None:
        raise ExerciseError(f"{path}:{inside}: {ANSWERS_BEGIN} never ends (add a line {ANSWERS_END})")
    return out


def exercises_md(regions):
    """The student's sheet: each exercise, where it is, its hint and the command that grades it."""
    text = ["# Exercises", "",
            "Each exercise is a `raise NotImplementedError` between two `# exercise N` comments. Write the",
            "code it replaces, then run its tests until they pass. Do them in order: the tests of each one",
            "need the exercises before it. When all are done, every test passes but those of the",
            "homework's task 3 (docs/homework.md), which wait for a loss you add:",
            '`python -m pytest -q -m "not slow" tests --ignore tests/test_homework.py`.', ""]
    for number in sorted({r.number for r in regions}):
        mine = [r for r in regions if r.number == number]
        text += [f"## {number}. {mine[0].title}", ""]
        for r in mine:
            # the raise's line in the copy: the regions above it in the same file shrank to one line
            line = r.begin + 1 - sum(q.end - q.begin - 2 for q in regions if q.path == r.path and q.begin < r.begin)
            text.append(f"- where: `{r.path}` line {line}, in `{r.function}`")
        text += [f"- hint: {HINTS[number]}", f"- graded by: `{grading_command(number)}`", ""]
    return "\n".join(text)


def write_student_copy(out, numbers=None, root=ROOT):
    """Copy the repo at root into the folder out (new, or empty), with the regions of the
    exercises in numbers (default: all) stubbed, and write out/EXERCISES.md. Returns the regions
    stubbed."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExerciseError(f"{out} exists and is not an empty folder; give a new one "
                            f"(a student's work is never overwritten)")
    files = [p for p in source_files(root) if p not in TEACHER_ONLY]
    regions = [r for r in all_regions(root, files) if numbers is None or r.number in numbers]
    for path in files:
        target = os.path.join(out, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        mine = [r for r in regions if r.path == path]
        lines = None
        if mine or path.endswith(".md"):
            with open(os.path.join(root, path), encoding="utf-8") as f:
                lines = f.read().splitlines()
        if lines is not None and (mine or ANSWERS_BEGIN in lines):
            with open(target, "w", encoding="utf-8") as f:
                f.write("\n".join(stub(lines, mine) if mine else without_answers(lines, path)) + "\n")
        else:
            shutil.copy2(os.path.join(root, path), target)
    with open(os.path.join(out, "EXERCISES.md"), "w", encoding="utf-8") as f:
        f.write(exercises_md(regions))
    return regions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the folder to write the student copy into (new, or empty)")
    parser.add_argument("--first", type=int, default=len(HINTS), metavar="K",
                        help=f"take out exercises 1 to K only (default: all {len(HINTS)})")
    args = parser.parse_args(argv)
    if not 1 <= args.first <= len(HINTS):
        parser.error(f"--first {args.first}: choose 1 to {len(HINTS)}")
    try:
        regions = write_student_copy(args.out, set(range(1, args.first + 1)))
    except ExerciseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    numbers = sorted({r.number for r in regions})
    print(f"wrote {args.out}: the repo with {len(numbers)} exercise{'s' * (len(numbers) > 1)} to write "
          f"({', '.join(map(str, numbers))}); {os.path.join(args.out, 'EXERCISES.md')} lists them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
