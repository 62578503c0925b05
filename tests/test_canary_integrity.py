"""#19 item 2: one key holder cannot steer the canary.

The decision rule by simulation (a known true win rate, looks after every vote), the per-user
counting and vote limit, and on a real chat API with a real canary engine: pair answers that a
seed or a pinned version cannot map to versions, a rollback that needs as many votes as a
promotion, and one key whose votes cannot decide a canary alone.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.app import build_app
from services.canary import Side, Tally, canary_decision, count_votes
from kaizen.core.registry import Registry
from kaizen.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, OTHER_KEY, USER_KEY, make_settings, stop_group
from tests.test_feedback import seed_comparison
from tests.test_rollout import make_version, start_server

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS = [f"integrity-user-{i:02d}" for i in range(24)]
TOPIC = "kaizen.model-events.integrity-test"

# -- the decision rule, simulated ---------------------------------------------------------------

ALPHA, MIN_VOTES, MIN_USERS, TUNED_VOTES = 0.05, 30, 10, 100
LOOKS = 400  # votes per simulated canary; the rule is re-checked after each one
RUNS = 500
TIES = 0.2  # share of ties and "both bad" (the recorded loop run had 27 of 120)


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson interval the rollout recomputed on every look before #19."""
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def new_rule(tally: Tally) -> str:
    return canary_decision(tally, alpha=ALPHA, min_votes=MIN_VOTES, min_users=MIN_USERS,
                           tuned_votes=TUNED_VOTES).verdict


def old_rule(tally: Tally) -> str:
    """Before #19: roll back as soon as the interval lies below 0.5, promote after MIN_VOTES votes."""
    lower, upper = wilson(tally.score, tally.votes)
    if upper < 0.5:
        return "rollback"
    if tally.votes >= MIN_VOTES and lower > 0.5:
        return "promote"
    return "collecting"


def simulate(rule: Callable[[Tally], str], theta: float, seed: int) -> dict[str, float]:
    """Share of RUNS canaries the rule promoted / rolled back when the canary's true win rate
    (ties counting half) is theta; every vote from a new user, the rule checked after each vote."""
    rng = np.random.default_rng(seed)
    p_win = theta - TIES / 2
    decided = {"promote": 0, "rollback": 0}
    for _ in range(RUNS):
        draws = rng.choice(3, size=LOOKS, p=[p_win, 1 - TIES - p_win, TIES])  # 0 canary, 1 champion, 2 tie
        wins = np.cumsum(draws == 0)
        losses = np.cumsum(draws == 1)
        ties = np.cumsum(draws == 2)
        for n in range(1, LOOKS + 1):
            tally = Tally(canary_wins=int(wins[n - 1]), champion_wins=int(losses[n - 1]),
                          ties=int(ties[n - 1]), users=n, cast=n)
            verdict = rule(tally)
            if verdict != "collecting":
                decided[verdict] += 1
                break
    return {k: v / RUNS for k, v in decided.items()}


def test_sequential_rule_keeps_wrong_decisions_under_alpha_when_rechecked_after_every_vote() -> None:
    """#19 item 2: the decision is re-checked every few seconds; with a known true win rate, the
    anytime-valid rule's wrong promotions and rollbacks over all looks stay at or below alpha,
    where the Wilson interval recomputed on every look (the rule before) exceeds it."""
    even = simulate(new_rule, 0.5, seed=1)
    worse = simulate(new_rule, 0.45, seed=2)
    better = simulate(new_rule, 0.55, seed=3)
    old_even = simulate(old_rule, 0.5, seed=1)
    clear_win = simulate(new_rule, 0.7, seed=4)
    clear_loss = simulate(new_rule, 0.3, seed=5)
    print(f"anytime rule, alpha {ALPHA}, {RUNS} canaries x {LOOKS} looks: theta 0.5 {even}; "
          f"0.45 {worse}; 0.55 {better}; 0.7 {clear_win}; 0.3 {clear_loss}")
    print(f"Wilson on every look: theta 0.5 {old_even}")
    assert even["promote"] + even["rollback"] <= ALPHA, even  # neither is right when they are equal
    assert worse["promote"] <= ALPHA, worse
    assert better["rollback"] <= ALPHA, better
    assert old_even["promote"] + old_even["rollback"] > ALPHA, old_even  # what repeated looks did before
    # not by never deciding: clear differences are found within the looks
    assert clear_win["promote"] >= 0.9 and clear_loss["rollback"] >= 0.9, (clear_win, clear_loss)


def test_each_user_counts_at_most_their_share_and_decisions_need_distinct_users() -> None:
    """#19 item 2: only each user's first `max_per_user` votes count toward a canary's decision,
    and the votes decide nothing before `min_users` distinct users have voted."""
    one_key: list[tuple[str, Side]] = [("u-attacker", "canary")] * 50
    tally = count_votes(one_key + [("u-1", "champion"), ("u-2", "tie")], max_per_user=5)
    assert (tally.canary_wins, tally.champion_wins, tally.ties, tally.users, tally.cast) == (5, 1, 1, 3, 52)
    unanimous = Tally(canary_wins=40, users=4, cast=40)
    d = canary_decision(unanimous, alpha=ALPHA, min_votes=MIN_VOTES, min_users=MIN_USERS,
                        tuned_votes=TUNED_VOTES)
    assert d.verdict == "collecting" and "10 users" in d.reason, d
    spread = Tally(canary_wins=40, users=10, cast=40)
    assert canary_decision(spread, alpha=ALPHA, min_votes=MIN_VOTES, min_users=MIN_USERS,
                           tuned_votes=TUNED_VOTES).verdict == "promote"
    # the floor is the same both ways: a unanimous rollback below min_votes waits too
    few = Tally(champion_wins=MIN_VOTES - 1, users=MIN_VOTES - 1, cast=MIN_VOTES - 1)
    assert canary_decision(few, alpha=ALPHA, min_votes=MIN_VOTES, min_users=MIN_USERS,
                           tuned_votes=TUNED_VOTES).verdict == "collecting"


def test_votes_per_user_are_limited_per_window(tmp_path: Path) -> None:
    """#19 item 2: a user may cast `vote_limit_per_window` votes per `vote_limit_window`; the next
    is refused 429 (OpenAI shape, Retry-After) until the oldest vote leaves the window."""
    settings = make_settings(tmp_path, api_keys=f"{USER_KEY},{OTHER_KEY}", admin_token=ADMIN_TOKEN,
                             rate_limit_rps=1000, rate_limit_burst=1000, vote_limit_per_window=3,
                             vote_limit_window=timedelta(minutes=10))
    client = TestClient(build_app(settings))
    ids = [seed_comparison(client, USER_KEY) for _ in range(4)]
    for cid in ids[:3]:
        r = client.post("/v1/feedback", headers={"Authorization": f"Bearer {USER_KEY}"},
                        json={"comparison_id": cid, "choice": 0})
        assert r.status_code == 202, r.text
    refused = client.post("/v1/feedback", headers={"Authorization": f"Bearer {USER_KEY}"},
                          json={"comparison_id": ids[3], "choice": 0})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "vote_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["Retry-After"]) <= 600
    other = seed_comparison(client, OTHER_KEY)  # another key has its own count
    assert client.post("/v1/feedback", headers={"Authorization": f"Bearer {OTHER_KEY}"},
                       json={"comparison_id": other, "choice": 1}).status_code == 202
    # the oldest vote leaves the window (its time moved back in the real store): one more is accepted
    old = (datetime.now(UTC) - timedelta(minutes=11)).isoformat()
    with sqlite3.connect(settings.api_db) as db:
        db.execute("UPDATE comparisons SET voted_at = ? WHERE id = ?", (old, ids[0]))
    again = client.post("/v1/feedback", headers={"Authorization": f"Bearer {USER_KEY}"},
                        json={"comparison_id": ids[3], "choice": 0})
    assert again.status_code == 202, again.text


# -- on a real chat API with a real canary --------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Unsharpened versions (near-uniform next-token distributions): a sampled answer is one of
    very many, so only the same seed can reproduce it."""
    root = tmp_path_factory.mktemp("integrity-versions")
    return {f"v{i}": make_version(tiny_model, root / f"m{i}", seed=300 + i, embed_scale=1.0, mlp_scale=1.0)
            for i in range(4)}


@pytest.fixture(scope="module")
def settings(folders: dict[str, Path], broker: Settings,
             tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # health checks (error rate, time to first token) are out of this module's way: votes decide
    return make_settings(tmp_path_factory.mktemp("integrity-api"), model=folders["v0"],
                         broker_port=broker.broker_port, api_keys=",".join(KEYS), admin_token=ADMIN_TOKEN,
                         rate_limit_rps=1000, rate_limit_burst=1000, auto_rollout=True, canary_fraction=0.5,
                         canary_min_votes=10, canary_min_users=3, canary_max_votes_per_user=2,
                         canary_tuned_votes=20, canary_min_requests=100_000, registry_poll_interval_s=0.5,
                         topic_model_events=TOPIC)


@pytest.fixture(scope="module")
def base(settings: Settings) -> Iterator[str]:
    proc = start_server(settings)
    yield f"http://127.0.0.1:{settings.port}"
    stop_group(proc)


def status(base: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/admin/rollout", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_for(base: str, check: Callable[[dict[str, Any]], bool], timeout_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        s = status(base)
        if check(s):
            return s
        assert time.monotonic() < deadline, f"rollout never reached the expected state: {s}"
        time.sleep(0.25)  # between polls


def fresh_canary(base: str, settings: Settings, folder: Path) -> str:
    """Withdraw any canary, publish `folder` and wait until the automatic rollout serves it."""
    if status(base)["canary"] is not None:
        r = httpx.post(f"{base}/admin/rollback", headers=ADMIN, timeout=120, json={"reason": "next test"})
        assert r.status_code == 200, r.text
    champion = status(base)["champion"]
    registry = Registry(settings.registry_path)
    version = registry.publish(folder, parent=champion, who="trainer", why="test").version
    wait_for(base, lambda s: s["serving"]["canary"] == version)
    return version


def pair(client: httpx.Client, base: str, settings: Settings, key: str, content: str,
         **extra: Any) -> tuple[str, list[str], list[str], list[dict[str, Any]]]:
    """A forced pair: (comparison_id, texts, versions by side, sampling by side as stored).

    The versions by side come from the API's own store: a simulated voter's oracle."""
    r = client.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={
        "messages": [{"role": "user", "content": content}], "max_tokens": 4, "comparison": "force", **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    with sqlite3.connect(settings.api_db) as db:
        answers = json.loads(db.execute("SELECT answers FROM comparisons WHERE id = ?",
                                        (body["comparison_id"],)).fetchone()[0])
    return (body["comparison_id"], [c["message"]["content"] for c in body["choices"]],
            [a["model_version"] for a in answers], [a["sampling"] for a in answers])


def vote_for(client: httpx.Client, base: str, settings: Settings, key: str, favour: str, i: int) -> bool:
    """One pair for `key`, voted for the answer of `favour`; False if the pair was not mixed."""
    cid, _, versions, _ = pair(client, base, settings, key, f"question {i}")
    if len(set(versions)) != 2:
        return False
    r = client.post(f"{base}/v1/feedback", headers={"Authorization": f"Bearer {key}"},
                    json={"comparison_id": cid, "choice": versions.index(favour)})
    assert r.status_code == 202, r.text
    return True


def test_a_seed_or_a_pinned_version_cannot_map_pair_answers_to_versions(
        base: str, settings: Settings, folders: dict[str, Path]) -> None:
    """#19 item 2: a paired answer ignores the request's seed, so the same request pinned to the
    champion (or sent by a user the canary serves) cannot reproduce one side word for word."""
    canary = fresh_canary(base, settings, folders["v1"])
    sampled = {"max_tokens": 8, "temperature": 1.0, "seed": 1234}
    with httpx.Client(timeout=120) as client:
        _, texts, versions, sampling = pair(client, base, settings, KEYS[0], "Tell me a story.", **sampled)
        assert sorted(versions) == ["v0", canary]
        pinned = client.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS[0]}"},
                             json={"messages": [{"role": "user", "content": "Tell me a story."}],
                                   "model": "v0", **sampled})
        assert pinned.status_code == 200 and pinned.json()["model_version"] == "v0", pinned.text
        reproduced = pinned.json()["choices"][0]["message"]["content"]
        assert reproduced not in texts, (reproduced, dict(zip(versions, texts, strict=True)))
        assert all(s["seed"] is None for s in sampling), sampling  # recorded truthfully: not the user's


def test_the_canary_version_cannot_be_pinned(base: str, settings: Settings, folders: dict[str, Path]) -> None:
    """#19 item 2: `model: "vN"` naming the canary is answered as an unknown model (404), so no key
    samples the canary at will (outside its share of users) to match pair answers to versions;
    the champion's version can still be pinned."""
    canary = status(base)["canary"] or fresh_canary(base, settings, folders["v1"])
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEYS[0]}"}) as client:
        refused = client.post(f"{base}/v1/chat/completions", json={**ask, "model": canary})
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["code"] == "model_not_found"
        champion = client.post(f"{base}/v1/chat/completions", json={**ask, "model": status(base)["champion"]})
        assert champion.status_code == 200, champion.text


def test_a_rollback_needs_as_many_votes_as_a_promotion(
        base: str, settings: Settings, folders: dict[str, Path]) -> None:
    """#19 item 2: five unanimous votes against the canary (from five users) rolled it back before;
    now a rollback on votes needs `canary_min_votes`, like a promotion."""
    canary = fresh_canary(base, settings, folders["v2"])
    with httpx.Client(timeout=120) as client:
        for i in range(5):
            assert vote_for(client, base, settings, KEYS[1 + i], "v0", i)
    s = wait_for(base, lambda s: s["canary"] is None or "(5 cast)" in s["decision"]["reason"])
    assert s["canary"] == canary and s["decision"]["state"] == "collecting", s["decision"]
    assert s["head_to_head"]["champion_wins"] == 5 and s["head_to_head"]["upper"] > 0.5


def test_one_key_cannot_decide_a_canary(base: str, settings: Settings, folders: dict[str, Path]) -> None:
    """#19 item 2: twelve unanimous votes from one key promoted the canary before; now only its
    first `canary_max_votes_per_user` count and one user is below `canary_min_users`. Votes of
    distinct users then decide it."""
    canary = fresh_canary(base, settings, folders["v3"])
    attacker = KEYS[10]
    with httpx.Client(timeout=120) as client:
        for i in range(12):
            assert vote_for(client, base, settings, attacker, canary, i)
        s = wait_for(base, lambda s: s["canary"] is None or "(12 cast)" in s["decision"]["reason"])
        assert s["canary"] == canary and s["decision"]["state"] == "collecting", s["decision"]
        h = s["head_to_head"]
        assert (h["votes"], h["votes_cast"], h["users"], h["canary_wins"]) == (2, 12, 1, 2), h
        # the same evidence from distinct users decides: 2 + 8 unanimous votes from 9 users
        for i, key in enumerate(KEYS[11:20]):
            if not vote_for(client, base, settings, key, canary, 100 + i):
                break  # decided: pairs are no longer champion vs canary
    s = wait_for(base, lambda s: s["champion"] == canary)
    assert s["canary"] is None
