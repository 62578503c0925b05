"""The reward model's learning rate under a time budget (setting reward_budget_decay,
trainer/reward_train.LrPlan): a run the clock stops ends its linear decay with the budget instead
of being cut at the rate its epochs planned for that step. Off by default: bench/README.md measured
it worse where the cut is hard.

    python -m pytest tests/test_reward_budget.py -q
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.reward_budget import paired_difference, parse_arm
from trainer.distributed import ONE_PROCESS
from trainer.reward_model import load_reward_model
from trainer.reward_train import LrPlan, train_reward_model
from tests.test_reward import synthetic_pairs, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_plan_warms_up_decays_to_zero_and_replans_to_the_time_left() -> None:
    plan = LrPlan(100, 0.05)  # warmup: 5 steps
    assert [plan.factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert plan.factor(52) == pytest.approx(48 / 95) and plan.factor(99) == pytest.approx(1 / 95)
    plan.replan(0, 0.0, 5.0, ONE_PROCESS)  # no pace yet: the epochs' plan stands
    assert plan.total == 100
    plan.replan(40, 20.0, 10.0, ONE_PROCESS)  # 40 steps in 20 s, 10 s left: 20 more fit
    assert plan.total == 60 and plan.factor(59) == pytest.approx(1 / 57)  # warmup: int(60 x 0.05) = 3
    plan.replan(40, 20.0, 1e6, ONE_PROCESS)  # never more than the epochs planned
    assert plan.total == 100
    plan.replan(40, 20.0, float("inf"), ONE_PROCESS)  # no budget: unchanged
    assert plan.total == 100
    plan.replan(40, 20.0, -3.0, ONE_PROCESS)  # past the deadline: this step is the last
    assert plan.total == 41 and plan.factor(40) == pytest.approx(1 / 39)  # warmup: 2


def test_a_run_the_clock_stops_ends_its_decay_with_the_budget(tiny_model: Path) -> None:
    """Epochs planned for ~1,000 steps, a budget of a few seconds: with the budget's decay the
    last step runs at a few per cent of the peak (its share of the time left when it began, which
    a step slower than the run's pace can make a few steps' worth); without it, at nearly the peak."""
    train = synthetic_pairs(48, seed=4)  # 6 steps an epoch
    results = {}
    for decay in (True, False):
        config = tiny_config(epochs=200, max_minutes=0.2, budget_decay=decay, warmup_fraction=0.01)
        model, tok = load_reward_model(tiny_model, seed=0)
        results[decay] = train_reward_model(model, tok, train, [], config, progress=False)
    for r in results.values():
        assert r.stopped == "time budget" and r.planned_steps == 1200 and 15 <= r.steps < 1200, r
    assert results[True].lr_end <= min(0.25, 4 / results[True].steps), results[True].record()
    assert results[False].lr_end > 0.9, results[False].record()
    assert results[True].record()["lr_end"] == round(results[True].lr_end, 4)


def test_a_budget_that_does_not_bind_changes_nothing(tiny_model: Path) -> None:
    train = synthetic_pairs(48, seed=5)
    losses = []
    for minutes in (None, 30.0):
        model, tok = load_reward_model(tiny_model, seed=0)
        config = tiny_config(epochs=2, max_minutes=minutes, budget_decay=True)
        result = train_reward_model(model, tok, train, [], config, progress=False)
        assert (result.stopped, result.steps) == ("done", 12), result
        assert result.lr_end == pytest.approx(1 / 11)  # warmup: 1 step
        losses.append(result.losses)
    assert losses[0] == losses[1]


def test_the_paired_difference_and_its_interval() -> None:
    a, b = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.5) and 0.0 <= d["low"] <= 0.5 <= d["high"] <= 1.0, d
    same = paired_difference(a, a)
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    shifted = paired_difference(torch.arange(50.0) + 2.0, torch.arange(50.0))  # every pair differs by 2
    assert shifted == {"mean": 2.0, "low": 2.0, "high": 2.0}


def test_the_bench_trains_both_ways_on_files_and_reports(tmp_path: Path, tiny_model: Path) -> None:
    """bench/reward_budget.py end to end on the tiny model: pairs files in, both trainings out."""
    for name, pairs in (("train", synthetic_pairs(48, seed=6)), ("test", synthetic_pairs(16, seed=7))):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "reward_budget.py"), "--train",
                          str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl"), "--minutes", "0.1",
                          "--epochs", "200", "--model", str(tiny_model), "--threads", "1", "--quiet",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("reward-budget-*.json")).read_text())
    decay, cut = report["rows"]
    assert (decay["budget_decay"], cut["budget_decay"]) == (True, False)
    for row in (decay, cut):
        assert row["train"]["stopped"] == "time budget" and row["unseen"]["pairs"] == 16, row
        assert "seen" not in row  # the synthetic questions are drawn anew: none repeats a training one
    assert decay["train"]["lr_end"] < cut["train"]["lr_end"], (decay["train"], cut["train"])
    assert set(report["first_minus_second"]["unseen"]) == {"accuracy", "bt_loss"}
    assert "unseen accuracy" in out.stdout and "budget_decay=True − budget_decay=False" in out.stdout, out.stdout


def test_an_arm_names_reward_config_fields_with_typed_values() -> None:
    """`--arm lr=1e-4,budget_decay=true` overrides those RewardConfig fields; a name that is not a
    field is refused with the fields listed, not silently ignored."""
    assert parse_arm("lr=1e-4, budget_decay=true") == {"lr": 1e-4, "budget_decay": True}
    assert parse_arm("dtype=float32,train_layers=4") == {"dtype": "float32", "train_layers": 4}
    with pytest.raises(argparse.ArgumentTypeError, match="learning_rate=.*budget_decay"):
        parse_arm("learning_rate=1e-4")
