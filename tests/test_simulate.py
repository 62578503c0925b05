"""Judges and simulated users, against the real chat API (tiny model) and its real outbox."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kaizen.core.settings import Settings
from simulation.judges import deciding_part, language_of, load_judge, rubric, rubric_parts, rubric_score
from simulation.simulate import (DEFAULT_EVAL_PROMPTS, DEFAULT_PROMPTS, SimulateConfig, read_prompts,
                                 simulate)
from tests.conftest import OTHER_KEY, ROOT, USER_KEY
from tests.test_feedback import outbox

Q = [{"role": "user", "content": "Why do leaves change colour in autumn?"}]
GOOD = ("Leaves change colour in autumn because trees stop making chlorophyll, so the green fades and "
        "the yellow and orange pigments in the leaves show.")
REPETITIVE = "leaves leaves leaves leaves leaves leaves leaves leaves leaves leaves leaves leaves"
FRENCH = ("Les feuilles changent de couleur en automne parce que les arbres arrêtent de produire de la "
          "chlorophylle.")
TRUNCATED = "Leaves change colour in autumn because trees stop making chlorophyll, so the green"


def test_rubric_prefers_the_better_answer_either_side() -> None:
    for worse in (REPETITIVE, FRENCH, TRUNCATED):
        assert rubric(Q, GOOD, worse) == 0, worse
        assert rubric(Q, worse, GOOD) == 1, worse
    assert rubric(Q, GOOD, GOOD) == "tie"
    assert rubric(Q, "", "") == "both_bad"
    assert language_of(FRENCH) == "fr" and language_of(GOOD) == "en" and language_of("Привет, как дела?") == "non-latin"
    assert rubric_score(Q[0]["content"], GOOD) > 0.8 > rubric_score(Q[0]["content"], REPETITIVE)


def test_the_rubric_names_the_quality_that_decided_a_pair() -> None:
    """bench/reward_votes.py --by-rubric-part groups pairs by it."""
    q = Q[0]["content"]
    assert deciding_part(q, GOOD, FRENCH) == "language"
    assert deciding_part(q, GOOD, TRUNCATED) == "complete"
    assert deciding_part(q, GOOD, REPETITIVE) == "repetition"
    off_topic = "Trees are tall plants with a trunk, and many of them live for hundreds of years."
    assert deciding_part(q, GOOD, off_topic) == "topic"
    parts = rubric_parts(q, GOOD)
    assert parts["topic"] == 1.0 and parts["complete"] == 1.0 and rubric_parts(q, "")["language"] == 0.0
    assert rubric_score(q, off_topic) == pytest.approx(rubric_score(q, GOOD) - 0.25)


def test_judges_load_from_modules_and_files(tmp_path: Path) -> None:
    assert load_judge("simulation.judges:rubric") is rubric
    assert load_judge("trainer.judges:rubric") is rubric  # as results recorded before the move name it
    f = tmp_path / "my judge.py"
    f.write_text("def prefer_b(messages, a, b):\n    return 1\n")
    assert load_judge(f"{f}:prefer_b")(Q, "x", "y") == 1
    for bad in ("simulation.judges", "trainer.judges:nope", f"{tmp_path}/missing.py:f", ":f"):
        with pytest.raises(ValueError):
            load_judge(bad)


def test_prompt_files_are_disjoint_and_checked(tmp_path: Path) -> None:
    train, evaluation = read_prompts(DEFAULT_PROMPTS), read_prompts(DEFAULT_EVAL_PROMPTS)
    assert len(train) >= 100 and len(evaluation) >= 40
    assert not set(train) & set(evaluation)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompts(bad)


def test_simulated_votes_reach_the_outbox_as_the_judge_decided(api_server: tuple[str, Settings]) -> None:
    base, settings = api_server
    before = {e.event_id for e in outbox(settings)}
    config = SimulateConfig(base_url=base, api_keys=[USER_KEY, OTHER_KEY], users=2, rate=0, votes=6,
                            max_tokens=12, seed=1)
    stats = asyncio.run(simulate(config, rubric, read_prompts(DEFAULT_PROMPTS)))
    assert stats.votes == 6 and not stats.errors, stats.as_dict()
    new = [e for e in outbox(settings) if e.event_id not in before]
    assert len(new) == 6
    for e in new:
        expected = rubric([m.model_dump() for m in e.messages], e.answers[0].text, e.answers[1].text)
        assert e.choice == expected
        assert e.messages[-1].content in read_prompts(DEFAULT_PROMPTS)


def test_cli_with_a_judge_from_a_file(api_server: tuple[str, Settings], tmp_path: Path) -> None:
    base, settings = api_server
    judge = tmp_path / "judge.py"
    judge.write_text("def always_a(messages, a, b):\n    return 0\n")
    before = {e.event_id for e in outbox(settings)}
    log = tmp_path / "votes.jsonl"
    run = subprocess.run([sys.executable, "-m", "kaizen", "simulate", "--votes", "3", "--users", "1", "--rate", "0",
                          "--max-tokens", "8", "--judge", f"{judge}:always_a", "--url", base,
                          "--api-key", USER_KEY, "--log", str(log)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=settings.child_env())
    assert run.returncode == 0, run.stderr[-2000:]
    new = [e for e in outbox(settings) if e.event_id not in before]
    assert [e.choice for e in new] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 3
    bad = subprocess.run([sys.executable, "-m", "kaizen", "simulate", "--judge", "nope:x", "--url", base],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=settings.child_env())
    assert bad.returncode == 2 and "nope" in bad.stdout + bad.stderr


def test_reward_model_judge_follows_its_model(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`simulation.judges:reward_model` with a real (tiny) reward model trained to like a marker word."""
    from tests.test_reward import MARKER, synthetic_pairs, tiny_config
    from simulation import judges
    from trainer.reward_model import load_reward_model, save_model
    from trainer.reward_train import train_reward_model

    model, tokenizer = load_reward_model(tiny_model, seed=0)
    train_reward_model(model, tokenizer, synthetic_pairs(96, seed=3), [], tiny_config(epochs=3), progress=False)
    save_model(model, tokenizer, tmp_path / "judge-rm", {"purpose": "judge"})
    judge = load_judge("simulation.judges:reward_model")

    monkeypatch.delenv("KAIZEN_JUDGE_REWARD_MODEL", raising=False)
    with pytest.raises(RuntimeError, match="KAIZEN_JUDGE_REWARD_MODEL"):
        judge(Q, "a", "b")
    monkeypatch.setenv("KAIZEN_JUDGE_REWARD_MODEL", str(tmp_path / "judge-rm"))
    judges._load_rm.cache_clear()
    pairs = synthetic_pairs(20, seed=11)  # unseen questions and answers
    verdicts = [judge(p.prompt, p.chosen, p.rejected) for p in pairs]
    swapped = [judge(p.prompt, p.rejected, p.chosen) for p in pairs]
    assert verdicts.count(0) >= 16 and swapped.count(1) >= 16, (verdicts, swapped)
    assert judge(pairs[0].prompt, pairs[0].chosen, pairs[0].chosen) == "tie"
    # the evaluation's batched path: one length-sorted pass over all answers, each scored once,
    # gives the verdicts of one pair at a time; a plain function judge is called pair by pair
    items = [(p.prompt, p.chosen, p.rejected) for p in pairs] + [(p.prompt, p.rejected, p.chosen) for p in pairs]
    fresh = judges.RewardModelJudge()
    assert judges.judge_many(fresh, items) == verdicts + swapped
    assert len(fresh._scores) == 2 * len(pairs)
    calls: list[str] = []
    assert judges.judge_many(lambda m, a, b: calls.append(a) or 0, items[:3]) == [0, 0, 0] and len(calls) == 3


def test_a_vote_whose_connection_drops_is_sent_once_more_and_never_counted_twice() -> None:
    """The loop benchmark died once on httpx.ReadError from /v1/feedback (a kept-alive connection the
    server had just closed). A real loopback server here resets connections (RST, as a peer that
    closed does) or answers, in the order each case scripts; the API's one-vote-per-comparison rule
    is its 409 already_voted."""
    from simulation.simulate import Users

    async def run(script: list[str]) -> tuple[str | None, int]:
        seen = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal seen
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            action, seen = script[seen], seen + 1
            if action == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            status, body = {"202": ("202 Accepted", b"{}"),
                            "409": ("409 Conflict", b'{"error": {"code": "already_voted"}}')}[action]
            writer.write(f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\ncontent-type: application/json\r\n"
                         f"connection: close\r\n\r\n".encode() + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        users = Users(SimulateConfig(base_url=f"http://127.0.0.1:{port}", votes=1), lambda *a: 0, ["q"])
        async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            failed = await users.vote(http, "c1", 0)
        return failed, seen

    assert asyncio.run(run(["202"])) == (None, 1)
    assert asyncio.run(run(["reset", "202"])) == (None, 2)  # the dropped one never arrived: sent again
    assert asyncio.run(run(["reset", "409"])) == (None, 2)  # it had arrived: stored once, not twice
    failed, seen = asyncio.run(run(["reset", "reset"]))
    assert seen == 2 and failed is not None and failed.startswith("feedback ") and "Error" in failed
    assert asyncio.run(run(["409"])) == ("feedback 409", 1)  # a 409 without a dropped send is an error
