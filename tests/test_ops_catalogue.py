"""The metric catalogue (docs/metrics.md) agrees with the code (kaizen/core/metrics.py).

    .venv/bin/python -m pytest tests/test_ops_catalogue.py -q

Every prometheus_client metric object declared in kaizen.core.metrics must have a
row in the catalogue table with the same exposed name, type and labels, and
the table must name nothing the code does not declare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase

import kaizen.core.metrics
from tests.conftest import ROOT

CATALOGUE = ROOT / "docs" / "metrics.md"
PROCESSES = {"chat API", "trainer"}


@dataclass(frozen=True)
class Entry:
    name: str  # as exposed: counters with `_total`, histograms by their base name
    type: str
    labels: tuple[str, ...]


def declared() -> dict[str, Entry]:
    """Every metric object of kaizen.core.metrics, by exposed name."""
    out: dict[str, Entry] = {}
    for obj in vars(kaizen.core.metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        kind = obj._type  # "counter", "gauge", "histogram", ...
        suffix = {"counter": "_total", "info": "_info"}.get(kind, "")  # as prometheus_client exposes them
        name = obj._name + suffix
        assert name not in out, f"{name} declared twice"
        out[name] = Entry(name, kind, tuple(obj._labelnames))
    return out


def documented(text: str) -> dict[str, tuple[Entry, str]]:
    """Rows of the catalogue table: exposed name -> (entry, exposed-by column)."""
    out: dict[str, tuple[Entry, str]] = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*`(kaizen_[a-z0-9_]+)`\s*\|(.*)\|\s*$", line)
        if not m:
            continue
        cells = [c.strip() for c in m.group(2).split("|")]
        assert len(cells) == 4, f"catalogue row needs name|type|labels|exposed by|meaning: {line!r}"
        kind, labels, process, meaning = cells
        assert meaning, f"{m.group(1)}: no meaning given"
        assert m.group(1) not in out, f"{m.group(1)} documented twice"
        out[m.group(1)] = (Entry(m.group(1), kind, tuple(re.findall(r"`([a-z_][a-z0-9_]*)`", labels))), process)
    return out


def test_code_declares_metrics() -> None:
    # Guards the collector itself: an empty module would make the comparison vacuous.
    assert declared()["kaizen_engine_config_info"].type == "info"
    names = declared()
    assert len(names) >= 30, sorted(names)
    assert declared()["kaizen_http_requests_total"] == Entry(
        "kaizen_http_requests_total", "counter", ("route", "method", "status"))
    assert declared()["kaizen_http_request_duration_seconds"].type == "histogram"


def test_catalogue_matches_code() -> None:
    code = declared()
    docs = documented(CATALOGUE.read_text(encoding="utf-8"))
    missing = sorted(set(code) - set(docs))
    extra = sorted(set(docs) - set(code))
    assert not missing, f"declared in kaizen/core/metrics.py but not in docs/metrics.md: {missing}"
    assert not extra, f"in docs/metrics.md but not declared in kaizen/core/metrics.py: {extra}"
    wrong = [(code[n], docs[n][0]) for n in code if code[n] != docs[n][0]]
    assert not wrong, "type or labels differ (code, docs): " + "; ".join(f"{c} vs {d}" for c, d in wrong)
    bad_process = {n: p for n, (_, p) in docs.items() if p not in PROCESSES}
    assert not bad_process, f"'exposed by' must be one of {PROCESSES}: {bad_process}"


def test_names_follow_conventions() -> None:
    for entry in declared().values():
        assert re.fullmatch(r"kaizen_[a-z0-9_]+", entry.name), entry
        if entry.type != "counter":
            assert not entry.name.endswith("_total"), f"only counters end in _total: {entry}"


def test_catalogue_mentions_vllm_metrics() -> None:
    text = CATALOGUE.read_text(encoding="utf-8")
    assert "vllm:" in text


def test_parser_catches_disagreement() -> None:
    # The comparison must be able to fail: a wrong type, a wrong label and a dropped row.
    text = CATALOGUE.read_text(encoding="utf-8")
    tampered = text.replace("| `kaizen_engine_ready` | gauge |", "| `kaizen_engine_ready` | counter |")
    tampered = tampered.replace("`route`, `method`, `status`", "`route`, `method`")
    tampered = "\n".join(l for l in tampered.splitlines() if "`kaizen_votes_total`" not in l)
    docs = documented(tampered)
    code = declared()
    assert "kaizen_votes_total" not in docs
    assert docs["kaizen_engine_ready"][0] != code["kaizen_engine_ready"]
    assert docs["kaizen_http_requests_total"][0] != code["kaizen_http_requests_total"]
