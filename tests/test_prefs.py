"""`kaizen prefs import|export|stats` on a real broker and store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka.errors import KafkaTimeoutError

from kaizen.core.broker import ensure_topics
from kaizen.core.settings import Settings
from tests.conftest import ROOT, free_port, make_settings
from trainer import daemon
from trainer.consumer import PreferenceConsumer
from trainer.prefs import topic_size
from trainer.store import PreferenceStore

# 40 pairs from Anthropic HH-RLHF (MIT), harmless-base test split, as in ../shared/data
SAMPLE = Path(__file__).parent / "data" / "hh_harmless_sample.jsonl"


def kaizen(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kaizen", *args], env=settings.child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_import_export_stats_roundtrip(broker: Settings, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = broker.model_copy(update={
        "data_dir": tmp_path, "consumer_group": f"prefs-{tag}", "topic_preferences": f"prefs.{tag}",
        "topic_preferences_dlq": f"prefs.{tag}.dlq", "trainer_port": make_settings(tmp_path).trainer_port})
    ensure_topics(settings)
    source = [json.loads(line) for line in SAMPLE.read_text().splitlines()]

    out = kaizen(settings, "prefs", "import", str(SAMPLE))
    assert out.returncode == 0, out.stderr
    assert daemon.run(settings, once=True) == len(source)
    # importing the same file again adds nothing: event ids come from the content
    assert kaizen(settings, "prefs", "import", str(SAMPLE)).returncode == 0
    assert daemon.run(settings, once=True) == 0

    exported = kaizen(settings, "prefs", "export", "--format", "trl")
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(records) == len(source)
    by_prompt = {json.dumps(r["prompt"]): r for r in records}
    for pair in source:
        record = by_prompt[json.dumps(pair["prompt_messages"])]
        assert record["chosen"] == [{"role": "assistant", "content": pair["chosen"]}]
        assert record["rejected"] == [{"role": "assistant", "content": pair["rejected"]}]

    stats = kaizen(settings, "prefs", "stats")
    assert stats.returncode == 0, stats.stderr
    shown = json.loads(stats.stdout)
    assert shown["total"] == len(source) and shown["by_choice"] == {"0": len(source)}
    assert shown["by_version_pair"] == {"external vs external": len(source)}
    assert shown["dlq_size"] == 0 and sum(shown["per_day"].values()) == len(source)

    store = PreferenceStore(settings.preferences_db)
    assert store.count() == len(source)
    store.close()


def test_import_of_a_bad_file_names_the_line(tmp_path: Path) -> None:
    # a path longer than a console line: the error names it whole, on one line (rich wrapped it at 80
    # columns when stderr was not a terminal, splitting "...bad.jsonl" from ":2")
    (tmp_path / ("folder-" * 12)).mkdir()
    bad = tmp_path / ("folder-" * 12) / "bad.jsonl"
    bad.write_text(SAMPLE.read_text().splitlines()[0] + "\n{\"chosen\": \"x\"}\n")
    out = kaizen(make_settings(tmp_path), "prefs", "import", str(bad))
    assert out.returncode == 1 and f"{bad}:2: not a preference pair" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_clients_give_up_on_an_absent_broker_after_the_bootstrap_timeout(tmp_path: Path) -> None:
    """`kaizen prefs` and the trainer's consumer waited kafka-python's own 30 s for a broker that was
    down before they raised. Nothing listens on the port: a real outage, not a fake client."""
    settings = make_settings(tmp_path, broker_port=free_port(), kafka_bootstrap_timeout_s=2.0)
    for what, build in (("prefs", lambda: topic_size(settings, settings.topic_preferences)),
                        ("trainer consumer", lambda: PreferenceConsumer(settings, PreferenceStore(tmp_path / "p.db")))):
        started = time.monotonic()
        with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
            build()
        took = time.monotonic() - started
        assert took < 2.0 + 4, f"{what} took {took:.1f} s to give up"  # was 30 s
