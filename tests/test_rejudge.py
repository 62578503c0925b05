"""`kaizen bench judge`: a loop benchmark's saved evaluation answers, read again by another judge.

The loop itself writes answers.jsonl and a second reading reproduces its figures (tests/test_loop.py,
the short loop); here a hand-made answers file, judged by a judge written to a file, gives the win
rate worked out by hand, through the Python function and through the CLI, and bad input is refused
with the cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kaizen.cli import app
from simulation.evaluate import NULL_VERSION, read_answers, write_answers
from simulation.rejudge import rejudge
from trainer.rollout_engine import Sample

LONGER = '''
def prefers_longer(messages, a, b):
    if len(a) == len(b):
        return "tie"
    return 0 if len(a) > len(b) else 1
'''


def answers(folder: Path) -> Path:
    """3 prompts x 2 answers each for v0, v1 and v10. v1 is longer than v0 in pairs 1-4 (prompts 0 and
    1), equal in pair 5, shorter in pair 6 (prompt 2): per prompt 1, 1, 0.25 -> win rate 0.75.
    v10 is shorter everywhere: 0."""
    def s(prompt: int, text: str, finished: bool = True) -> Sample:
        return Sample(prompt, list(range(len(text.split()))), text, finished)

    v0 = [s(0, "a"), s(0, "a"), s(1, "a b"), s(1, "a b", False), s(2, "a b c"), s(2, "a b c d")]
    v1 = [s(0, "a b"), s(0, "a b c"), s(1, "a b c"), s(1, "a b c"), s(2, "x y z"), s(2, "a")]
    v10 = [s(0, ""), s(0, ""), s(1, "a"), s(1, "a"), s(2, "a"), s(2, "a")]
    write_answers(folder / "answers.jsonl", ["Why?", "How?", "Where?"], {"v0": v0, "v10": v10, "v1": v1})
    return folder


def test_another_judge_reads_the_saved_answers_as_worked_out_by_hand(tmp_path: Path) -> None:
    judge = tmp_path / "judge.py"
    judge.write_text(LONGER)
    report = rejudge(answers(tmp_path), f"{judge}:prefers_longer", bootstrap=200, seed=3)
    assert list(report["versions"]) == ["v0", "v1", "v10"]  # v1 before v10
    v1 = report["versions"]["v1"]
    assert v1["win_rate_vs_v0"] == pytest.approx(0.75)
    assert v1["tie_share"] == pytest.approx(1 / 6, abs=1e-4)
    assert 0.0 <= v1["ci95"][0] <= 0.75 <= v1["ci95"][1] <= 1.0
    assert report["versions"]["v10"]["win_rate_vs_v0"] == 0.0
    assert report["versions"]["v0"]["truncated_share"] == pytest.approx(1 / 6, abs=1e-4)
    assert report["prompts"] == 3 and report["bootstrap"] == 200 and report["seed"] == 3
    # a judge that prefers the other way reads the same answers the other way
    judge.write_text(LONGER + "\n\ndef prefers_shorter(m, a, b):\n    v = prefers_longer(m, a, b)\n"
                     "    return v if v == 'tie' else 1 - v\n")
    shorter = rejudge(tmp_path, f"{judge}:prefers_shorter", bootstrap=200, seed=3)
    assert shorter["versions"]["v1"]["win_rate_vs_v0"] == pytest.approx(1 - 0.75)


def test_the_null_control_is_read_apart_from_the_versions(tmp_path: Path) -> None:
    """The loop's null control (v0 drawn again, NULL_VERSION) is judged against v0 like a version but
    reported apart: a redraw with the same lengths is all ties (0.5), one longer in every pair wins all."""
    judge = tmp_path / "judge.py"
    judge.write_text(LONGER)
    prompts, saved = read_answers(answers(tmp_path) / "answers.jsonl")
    same = [Sample(s.prompt, s.token_ids, " ".join("z" * len(w) for w in s.text.split(" ")), s.finished)
            for s in saved["v0"]]
    write_answers(tmp_path / "answers.jsonl", prompts, {**saved, NULL_VERSION: same})
    report = rejudge(tmp_path, f"{judge}:prefers_longer", bootstrap=100)
    assert list(report["versions"]) == ["v0", "v1", "v10"]
    null = report["null_control"]
    assert null["win_rate_vs_v0"] == 0.5 and null["tie_share"] == 1.0 and null["ci95"] == [0.5, 0.5]
    longer = [Sample(s.prompt, s.token_ids, s.text + "!", s.finished) for s in saved["v0"]]
    write_answers(tmp_path / "answers.jsonl", prompts, {**saved, NULL_VERSION: longer})
    assert rejudge(tmp_path, f"{judge}:prefers_longer", bootstrap=100)["null_control"]["win_rate_vs_v0"] == 1.0
    (tmp_path / "plain").mkdir()
    assert "null_control" not in rejudge(answers(tmp_path / "plain"), f"{judge}:prefers_longer", bootstrap=100)
    result = CliRunner().invoke(app, ["bench", "judge", str(tmp_path), "--judge", f"{judge}:prefers_longer",
                                      "--bootstrap", "100"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "v0 redrawn" in result.output and "1.000" in result.output, result.output


def test_the_cli_prints_every_version_and_writes_the_report(tmp_path: Path) -> None:
    judge = tmp_path / "judge.py"
    judge.write_text(LONGER)
    out = tmp_path / "judged.json"
    result = CliRunner().invoke(app, ["bench", "judge", str(answers(tmp_path) / "answers.jsonl"),
                                      "--judge", f"{judge}:prefers_longer", "--bootstrap", "100",
                                      "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "0.750" in result.output and "v10" in result.output
    written = json.loads(out.read_text())
    assert written == rejudge(tmp_path, f"{judge}:prefers_longer", bootstrap=100)
    assert written["seed"] == 0  # no loop.json beside the answers: the loop's default seed


def test_the_loops_seed_and_bootstrap_are_the_defaults(tmp_path: Path) -> None:
    judge = tmp_path / "judge.py"
    judge.write_text(LONGER)
    answers(tmp_path)
    (tmp_path / "loop.json").write_text(json.dumps({"config": {"seed": 7, "bootstrap": 50}}))
    report = rejudge(tmp_path, f"{judge}:prefers_longer")
    assert (report["seed"], report["bootstrap"]) == (7, 50)


def test_bad_input_is_refused_with_its_cause(tmp_path: Path) -> None:
    judge = tmp_path / "judge.py"
    judge.write_text(LONGER)
    spec = f"{judge}:prefers_longer"
    result = CliRunner().invoke(app, ["bench", "judge", str(tmp_path / "nothing"), "--judge", spec],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "does not exist" in result.output
    # a run whose candidates all failed their gates evaluated nothing (simulation/evaluate.py): say so
    skipped = tmp_path / "skipped"
    skipped.mkdir()
    (skipped / "loop.json").write_text(json.dumps({"evaluation": {"skipped": "no version passed its gate"}}))
    result = CliRunner().invoke(app, ["bench", "judge", str(skipped), "--judge", spec], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "evaluated nothing" in result.output, result.output
    assert "no version passed its gate" in result.output
    answers(tmp_path)
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    (tmp_path / "answers.jsonl").write_text("\n".join(lines[:4] + ['{"version": "v1"}'] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=r"answers.jsonl:5: not an evaluation answer"):
        rejudge(tmp_path, spec)
    (tmp_path / "answers.jsonl").write_text("\n".join(line for line in lines if '"v0"' not in line) + "\n")
    with pytest.raises(ValueError, match="no answers of v0"):
        rejudge(tmp_path, spec)
    answers(tmp_path)
    with pytest.raises(ValueError, match="is not a function"):
        rejudge(tmp_path, f"{judge}:no_such_judge")


def test_written_answers_read_back_unchanged(tmp_path: Path) -> None:
    path = answers(tmp_path) / "answers.jsonl"
    prompts, read = read_answers(path)
    assert prompts == ["Why?", "How?", "Where?"]
    assert [s.text for s in read["v1"]] == ["a b", "a b c", "a b c", "a b c", "x y z", "a"]
    assert read["v0"][3] == Sample(1, [0, 1], "a b", False)


def test_versions_are_listed_in_number_order(tmp_path: Path) -> None:
    """v9 before v10 (a sort by name would put v10 first), whatever order the file has them in."""
    judge = tmp_path / "judge.py"
    judge.write_text(LONGER)
    one = [Sample(0, [0], "a", True)]
    write_answers(tmp_path / "answers.jsonl", ["Why?"], {"v10": one, "v0": one, "v9": one})
    assert list(rejudge(tmp_path, f"{judge}:prefers_longer")["versions"]) == ["v0", "v9", "v10"]
    write_answers(tmp_path / "answers.jsonl", ["Why?"], {"v0": one, "best": one})
    with pytest.raises(ValueError, match="'best' is not a version name"):
        rejudge(tmp_path, f"{judge}:prefers_longer")
