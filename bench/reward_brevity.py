"""Does a reward model pay for brevity, or for ending? One answer, three ways, scored side by side.

    python bench/reward_brevity.py --reward-model DATA/reward/rm-v1 --answers LOOP_OUT/answers.jsonl

PPO in `kaizen bench loop` shortens answers (v0's median 140 tokens, a trained version's 35-40) and the
rubric reads the short answers as off topic. Is that the reward model's taste? For answers that ended
(under the evaluation's max_tokens) and whose first sentence is under half of them, the reward model
scores, each as the answer to its own prompt:

- **full**: the answer as the policy wrote it (ended);
- **first sentence**: the same answer stopped after its first sentence (ended, shorter);
- **cut**: the first sentence and the next few words, stopped mid-sentence (as an answer cut off at
  max_tokens reads, at about the first sentence's length).

It prints how often the first sentence outscores the full answer (a reward model that pays for
brevity: most of the time) and how often the cut one outscores the first sentence (one that does not
pay for ending: about half), with 95% Wilson intervals, and the score's correlation with length over
the ended answers. A report, not a test.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, save_report  # noqa: E402

SENTENCE_END = re.compile(r"[.!?](\s|$)")
#: Words past the first sentence that make the "cut" variant (an answer stopped mid-sentence).
CUT_EXTRA_WORDS = 4


def variants(text: str) -> tuple[str, str] | None:
    """(first sentence, first sentence + a few words with no sentence end) of `text`, or None when its
    first sentence is not under half of it or no more than CUT_EXTRA_WORDS words follow it."""
    m = SENTENCE_END.search(text)
    if not m or m.end() >= len(text) / 2:
        return None
    first = text[:m.end()].strip()
    rest = text[m.end():].split()
    if len(rest) <= CUT_EXTRA_WORDS:
        return None
    cut = " ".join([first, *rest[:CUT_EXTRA_WORDS]]).rstrip(".!?\"')")
    return first, cut


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reward-model", type=Path, required=True, help="a reward-model folder")
    ap.add_argument("--answers", type=Path, required=True, help="a loop's answers.jsonl")
    ap.add_argument("--version", default="v0", help="whose answers (default v0)")
    ap.add_argument("--max-tokens", type=int, default=256, help="the evaluation's: longer ones were cut")
    ap.add_argument("--n", type=int, default=80, help="answers probed at most")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    import torch
    from rich.console import Console

    from kaizen.core.settings import get_settings
    from simulation.judges import RewardModelJudge
    from trainer.reward_eval import wilson_interval as wilson

    rows = [json.loads(line) for line in args.answers.read_text().splitlines() if line.strip()]
    ended = [r for r in rows if r["version"] == args.version and len(r["token_ids"]) < args.max_tokens]
    probed = [(r, v) for r in ended if (v := variants(r["text"]))][:args.n]
    settings = get_settings()
    torch.set_num_threads(settings.reward_threads or torch.get_num_threads())
    asked = [(r["prompt"], r["text"]) for r, _ in probed] + [(r["prompt"], v[0]) for r, v in probed]
    asked += [(r["prompt"], v[1]) for r, v in probed] + [(r["prompt"], r["text"]) for r in ended[:args.n * 2]]
    n = len(probed)
    with Console().status(f"scoring {len(asked)} answers (each distinct one once)"):
        scores = RewardModelJudge(args.reward_model).scores(
            [([{"role": "user", "content": p}], a) for p, a in asked])
    full, first, cut, every = scores[:n], scores[n:2 * n], scores[2 * n:3 * n], scores[3 * n:]
    shorter_wins = sum(f > a for a, f in zip(full, first))
    cut_wins = sum(c > f for f, c in zip(first, cut))
    lengths = [len(r["token_ids"]) for r in ended[:args.n * 2]]
    report: dict[str, Any] = {
        "reward_model": str(args.reward_model), "answers": str(args.answers), "version": args.version,
        "probed": n, "first_sentence_beats_full": shorter_wins / n, "ci95": wilson(shorter_wins, n),
        "cut_beats_first_sentence": cut_wins / n, "cut_ci95": wilson(cut_wins, n),
        "mean_score": {"full": float(np.mean(full)), "first_sentence": float(np.mean(first)),
                       "cut": float(np.mean(cut))},
        "ended_answers": len(lengths), "corr_score_tokens": float(np.corrcoef(every, lengths)[0, 1]),
    }
    lo, hi = report["ci95"]
    clo, chi = report["cut_ci95"]
    print(f"{n} answers: the first sentence outscores the full answer in {shorter_wins} "
          f"({shorter_wins / n:.2f} [{lo:.2f}, {hi:.2f}]); the cut one outscores the first sentence in "
          f"{cut_wins} ({cut_wins / n:.2f} [{clo:.2f}, {chi:.2f}]); corr(score, tokens) over "
          f"{len(lengths)} ended answers {report['corr_score_tokens']:+.3f}")
    save_report(args.out, "reward-brevity", report)


if __name__ == "__main__":
    main()
