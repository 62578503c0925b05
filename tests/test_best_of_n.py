"""bench/best_of_n.py's selection: which answer of the pool each baseline answer is judged against.
The script itself samples with vLLM and scores with reward models (a report, not a test)."""

from __future__ import annotations

from bench.best_of_n import best_of, ks
from trainer.rollout_engine import Sample


def test_the_sizes_double_up_to_the_pool() -> None:
    assert ks(16) == [1, 2, 4, 8, 16]
    assert ks(6) == [1, 2, 4, 6]
    assert ks(1) == [1]


def test_each_baseline_answer_meets_the_best_of_its_own_group_of_k() -> None:
    # prompt 0's pool of 4 scored 1, 5, 3, 2; prompt 1's 0, 0, 9, 4 (a tie keeps the first sampled)
    pool = [Sample(p, [j] * (j + 1), f"p{p}a{j}", True) for p in (0, 1) for j in range(4)]
    scores = [1.0, 5.0, 3.0, 2.0, 0.0, 0.0, 9.0, 4.0]
    texts = {k: {p: [s.text for s in v] for p, v in best_of(pool, scores, k, 4, 2).items()}
             for k in (1, 2, 4)}
    # k = 1: the pool's answers in turn; k = 2: groups (0, 1) and (2, 3) in turn; k = 4: the best of all
    assert texts[1] == {0: ["p0a0", "p0a1", "p0a2", "p0a3"], 1: ["p1a0", "p1a1", "p1a2", "p1a3"]}
    assert texts[2] == {0: ["p0a1", "p0a2", "p0a1", "p0a2"], 1: ["p1a0", "p1a2", "p1a0", "p1a2"]}
    assert texts[4] == {0: ["p0a1"] * 4, 1: ["p1a2"] * 4}
