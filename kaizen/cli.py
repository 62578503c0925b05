"""The `kaizen` command line.

    kaizen up                 # broker + chat API + trainer on embedded defaults
    kaizen --help             # every verb

Options override settings (kaizen/core/settings.py): each command builds its
settings once, then copies them with the options given.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kaizen.core.log_setup import setup_logging
from kaizen.core.settings import Settings, get_settings
from kaizen.bench_cli import bench_app
from kaizen.models_cli import models_app
from kaizen.reward_cli import reward_app
from kaizen.simulate_cli import simulate_cmd

app = typer.Typer(help="Kaizen: a chat service that gets better while people use it.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
model_app = typer.Typer(help="Model folders: the default model, tiny test models.", no_args_is_help=True)
prefs_app = typer.Typer(help="The preference store.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(prefs_app, name="prefs")
app.add_typer(reward_app, name="reward")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.command("simulate")(simulate_cmd)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a path in an error stays one line


def settings_with(**overrides: Any) -> Settings:
    base = get_settings()
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return base
    return Settings.model_validate({**base.model_dump(), **given})


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}")
    return typer.Exit(code)


@app.command()
def config(
    as_json: Annotated[bool, typer.Option("--json", help="JSON output")] = False,
    show_admin_url: Annotated[bool, typer.Option(
        "--show-admin-url",
        help="print the operator page's address that signs in with the admin token")] = False,
) -> None:
    """Print the effective settings, secrets masked."""
    if show_admin_url:
        raise typer.Exit(_show_admin_url(get_settings()))
    values = get_settings().masked()
    if as_json:
        console.print_json(json.dumps(values, default=str))
        return
    for key, value in values.items():
        console.print(f"[bold]{key}[/bold] = {value}")


def _show_admin_url(settings: Settings) -> int:
    from services.auth import admin_token, admin_url

    if settings.admin_token is not None:
        console.print(f"{settings.public_url}/admin  (sign in with KAIZEN_ADMIN_TOKEN; it is not printed)")
        return 0
    if settings.environment == "production":
        err.print("production mode has no generated admin token: set KAIZEN_ADMIN_TOKEN")
        return 1
    if not settings.binds_loopback:
        err.print(f"KAIZEN_HOST={settings.host} is not loopback: a generated admin token is only used on "
                  "127.0.0.1; set KAIZEN_ADMIN_TOKEN")
        return 1
    token = admin_token(settings)
    assert token is not None, "a development server on loopback always has an admin token"
    console.print(admin_url(settings, token))
    return 0


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="chat API port")] = None,
    model: Annotated[Path | None, typer.Option(help="model folder to serve")] = None,
) -> None:
    """Start broker, chat API and trainer; Ctrl-C stops all."""
    from kaizen.supervisor import run_up

    settings = settings_with(port=port, model=model)
    raise typer.Exit(run_up(settings))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind")] = None,
    model: Annotated[Path | None, typer.Option(help="model folder to serve")] = None,
) -> None:
    """Run the chat API only."""
    from services.app import serve as run_serve
    from services.models import ModelError, require_model

    settings = settings_with(host=host, port=port, model=model)
    setup_logging(settings)
    try:
        require_model(settings.model_dir)
    except ModelError as exc:
        raise fail(str(exc)) from None
    from kaizen.core.broker import port_in_use

    if port_in_use("127.0.0.1" if settings.host in {"0.0.0.0", "::"} else settings.host, settings.port):
        raise fail(f"port {settings.port} is already in use: is `kaizen serve` or `kaizen up` running?")
    run_serve(settings)


@app.command()
def train(
    once: Annotated[bool, typer.Option("--once", help="drain the topic, run one training round now, exit")] = False,
    no_round: Annotated[bool, typer.Option("--no-round", help="with --once: only drain the topic")] = False,
) -> None:
    """Run the trainer daemon: votes into the preference store, training rounds when due.

    On a node with KAIZEN_TRAIN_NODE_RANK above 0: a worker that joins each round node 0 starts."""
    from trainer.daemon import run, run_worker

    settings = get_settings()
    setup_logging(settings)
    if settings.train_node_rank > 0:
        raise typer.Exit(0 if run_worker(settings) >= 0 else 1)
    stored = run(settings, once=once)
    if once:
        console.print(f"stored {stored} new preference events")
        if not no_round:
            _one_round(settings)


rounds_app = typer.Typer(help="Training rounds: reward refresh, PPO, gate, publish.", no_args_is_help=True)
app.add_typer(rounds_app, name="rounds")


def _print_round(r: dict[str, Any]) -> None:
    gate = r.get("gate") or {}
    ppo = r.get("ppo") or {}
    parts = [f"[bold]{r.get('round_id')}[/bold] {r.get('outcome')}"]
    if r.get("phase") and r.get("outcome") == "running":
        parts.append(f"phase {r['phase']}")
    if r.get("version"):
        parts.append(f"-> {r['version']}")
    if ppo.get("iterations"):
        parts.append(f"PPO {ppo['iterations']} it, reward {ppo['reward_first']:+.3f} -> {ppo['reward_last']:+.3f}, "
                     f"KL {ppo['kl_last']:.3f}")
    if gate:
        lc = f" (at equal length {gate['lc_win_rate']:.2f})" if gate.get("lc_win_rate") is not None else ""
        parts.append(f"gate win {gate['win_rate']:.2f}{lc} KL {gate['kl']:.3f} sanity "
                     f"{'ok' if gate['sanity_passed'] else 'FAILED'}")
    for key in ("reason", "error"):
        if r.get(key):
            parts.append(str(r[key]))
    console.print("  ".join(parts))


@rounds_app.command("list")
def rounds_list(
    limit: Annotated[int, typer.Option(help="rounds to show, newest first")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output")] = False,
) -> None:
    """Recent training rounds (and one in progress), newest first."""
    from kaizen.core.rounds_log import read_rounds

    records = read_rounds(get_settings(), limit)
    if as_json:
        console.print_json(json.dumps(records, default=str))
        return
    if not records:
        console.print("no training rounds yet")
    for r in records:
        _print_round(r)


@rounds_app.command("run")
def rounds_run() -> None:
    """One training round now, on the votes already in the store (no Kafka needed)."""
    settings = get_settings()
    setup_logging(settings)
    _one_round(settings)


def _one_round(settings: Settings) -> None:
    """A training round now, printed; exit 75 if another one runs, 1 if it failed."""
    from trainer.daemon import run_one_round

    record = run_one_round(settings)
    if record is None:
        raise fail("another training round is running", code=75)
    _print_round(record)
    if record.get("outcome") == "failed":
        raise typer.Exit(1)


@app.command()
def broker(port: Annotated[int | None, typer.Option(help="port to listen on")] = None) -> None:
    """Run the embedded Kafka-compatible broker (Tansu) and create Kaizen's topics."""
    from kaizen.core.broker import BrokerError, ensure_topics, start_embedded_broker

    settings = settings_with(broker_port=port)
    setup_logging(settings)
    try:
        if not settings.embedded_broker:
            created = ensure_topics(settings)
            console.print(f"KAIZEN_KAFKA_BOOTSTRAP is set ({settings.bootstrap_servers}): no embedded "
                          f"broker started; topics created: {created or 'none missing'}")
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        proc = start_embedded_broker(settings)
    except BrokerError as exc:
        raise fail(str(exc)) from None
    try:
        created = ensure_topics(settings)
        console.print(f"broker on {settings.bootstrap_servers} (in memory); topics created: {created}")
        while proc.poll() is None and not stop.wait(0.2):
            pass
    except BrokerError as exc:
        raise fail(str(exc)) from None
    finally:
        if proc.poll() is None:
            proc.terminate()
        code = proc.wait()
    if stop.is_set():
        code = 0
    raise typer.Exit(0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code)


@model_app.command("prepare")
def model_prepare(
    force: Annotated[bool, typer.Option(help="rebuild even if present")] = False,
    verify: Annotated[bool, typer.Option(help="check by a greedy answer")] = True,
) -> None:
    """Build the default model (SmolLM2-135M-Instruct) into the data dir."""
    from services.models import ModelError, prepare_default

    settings = get_settings()
    try:
        result = prepare_default(settings, force=force, verify=verify)
    except ModelError as exc:
        raise fail(str(exc)) from None
    if not result.created:
        console.print(f"already prepared: {result.path}")
        return
    console.print(f"prepared {result.path}")
    if result.answer is not None:
        console.print(f"verification, greedy answer to 'What is the capital of France?': {result.answer}")


@model_app.command("tiny")
def model_tiny(
    directory: Annotated[Path, typer.Argument(help="folder to write")],
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
) -> None:
    """Write a tiny random Llama with the default model's tokenizer (for tests)."""
    from services.models import build_tiny

    path = build_tiny(get_settings(), directory, seed=seed)
    console.print(f"wrote tiny model to {path}")


@prefs_app.command("stats")
def prefs_stats() -> None:
    """Votes in the store: totals, by choice, by version pair, per day, tie and both-bad share, DLQ size."""
    from kafka.errors import KafkaError

    from trainer.prefs import topic_size
    from trainer.store import PreferenceStore

    settings = get_settings()
    store = PreferenceStore(settings.preferences_db)
    try:
        stats = store.stats()
    finally:
        store.close()
    try:
        stats["dlq_size"] = topic_size(settings, settings.topic_preferences_dlq)
    except KafkaError as exc:
        stats["dlq_size"] = f"unknown: broker at {settings.bootstrap_servers} unreachable ({exc})"
    console.print_json(json.dumps(stats))


@prefs_app.command("export")
def prefs_export(
    fmt: Annotated[str, typer.Option("--format", help="output format: trl")] = "trl",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="file (default: stdout)")] = None,
) -> None:
    """Chosen/rejected pairs as JSONL (TRL's conversational preference format)."""
    from trainer.prefs import trl_records
    from trainer.store import PreferenceStore

    if fmt != "trl":
        raise fail(f"unknown --format {fmt!r}: the supported format is trl")
    store = PreferenceStore(get_settings().preferences_db)
    n = 0
    try:
        with open(output, "w", encoding="utf-8") if output else contextlib.nullcontext(sys.stdout) as out:
            for record in trl_records(store):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
    finally:
        store.close()
    err.print(f"exported {n} pairs")


@prefs_app.command("erase")
def prefs_erase(
    user: Annotated[str, typer.Option("--user", help="the user's API key, or their pseudonym (u-...)")],
) -> None:
    """Delete one user's comparisons, votes and stored preferences everywhere this machine reaches."""
    from kaizen.privacy import EraseError, erase, pseudonym

    settings = get_settings()
    try:
        done = erase(settings, pseudonym(settings, user))
    except EraseError as exc:
        raise fail(str(exc)) from None
    console.print_json(json.dumps(done.as_dict()))
    if done.unreachable:
        raise typer.Exit(1)


@prefs_app.command("import")
def prefs_import(
        file: Annotated[Path, typer.Argument(help="JSONL pairs ({prompt, chosen, rejected} or TRL)")],
) -> None:
    """Send public preference pairs through the preferences topic, like live votes."""
    from kafka.errors import KafkaError

    from trainer.prefs import imported_events, send_events

    settings = get_settings()
    try:
        events = imported_events(file)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    try:
        sent = send_events(settings, events)
    except KafkaError as exc:
        raise fail(f"could not send to {settings.bootstrap_servers}: {exc} (is `kaizen up` or `kaizen broker` running?)") from None
    console.print(f"sent {sent} pairs from {file} to {settings.topic_preferences}; the trainer stores them")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
