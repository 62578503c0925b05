"""`kaizen models ...`: the operators' rollout commands, through the chat API's admin routes.

    kaizen models list
    kaizen models show v3
    kaizen models canary v3 --fraction 0.2 --reason "round 7 passed the gate"
    kaizen models promote            # the running canary
    kaizen models rollback --reason "users complain"
    kaizen models import ./my-finetune    # a Hugging Face folder trained elsewhere, as a candidate
    kaizen models gc [--dry-run]          # retention: delete rejected and old versions, old reward models
    kaizen models repair [--dry-run]      # rebuild an unreadable registry state.json

They talk HTTP to a running chat API (KAIZEN_HOST/KAIZEN_PORT, or --url) with
KAIZEN_ADMIN_TOKEN, so the server that swaps the weights is the one that
changes the registry, checks the files first, and emits the model event.
`import`, `gc` and `repair` write the registry folder themselves (as the trainer
publishes into it): they add a candidate, delete what nothing serves and no rollback
can reach (kaizen/core/retention.py), or rewrite a damaged state.json from its audit
log (kaizen/core/registry_repair.py).
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from services.auth import admin_token
from kaizen.core.settings import get_settings

models_app = typer.Typer(help="Model versions: list, inspect, canary, promote, roll back; retention (gc); "
                         "repair.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a path in an error stays one line

UrlOpt = Annotated[str | None, typer.Option("--url", help="chat API base URL (default: from settings)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-m", help="why: recorded in the audit log")]
#: A promotion waits for the weight swap, which first lets in-flight answers finish.
TIMEOUT_S = 180.0


def _call(method: str, path: str, url: str | None, body: dict[str, Any] | None = None) -> Any:
    settings = get_settings()
    base = (url or settings.public_url).rstrip("/")
    headers = {}
    token = admin_token(settings, create=False)  # KAIZEN_ADMIN_TOKEN, or the one `kaizen up` generated
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        r = httpx.request(method, f"{base}{path}", json=body, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        err.print(f"[bold red]error:[/bold red] cannot reach the chat API at {base} ({exc}); "
                  "is `kaizen up` / `kaizen serve` running? (--url to point elsewhere)")
        raise typer.Exit(2) from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:500]
        err.print(f"[bold red]error ({r.status_code}):[/bold red] {message}")
        raise typer.Exit(1)
    return r.json()


def _who() -> str:
    try:
        return f"{getpass.getuser()} (cli)"
    except (KeyError, OSError):
        return "operator (cli)"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _print_rollout(status: dict[str, Any]) -> None:
    champ, canary = status["champion"], status["canary"]
    line = f"champion [bold]{champ}[/bold]"
    if canary:
        line += f", canary [bold]{canary}[/bold] at {status['canary_fraction']:.0%} of users"
    serving = status["serving"]
    if serving["champion"] != champ or (canary and serving["canary"] != canary):
        line += f" [yellow](serving: {serving['champion']}, canary {serving['canary']})[/yellow]"
    console.print(line)
    h = status["head_to_head"]
    if canary:
        console.print(f"live votes: {h['votes']} (canary {h['canary_wins']}, champion {h['champion_wins']}, "
                      f"tie {h['ties']}, both bad {h['both_bad']}); canary win rate {_fmt(h['win_rate'], 2)} "
                      f"95% [{_fmt(h['lower'], 2)}, {_fmt(h['upper'], 2)}]")
        d = status["decision"]
        console.print(f"decision: {d['state']} ({d['reason']}); automatic: {'on' if status['auto_rollout'] else 'off'}")
    for v, why in status.get("refused", {}).items():
        console.print(f"[red]refused {v}: {why}[/red]")


@models_app.command("list")
def list_(url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Versions with stage, parent, gate result and whether they serve."""
    data = _call("GET", "/admin/versions", url)
    if as_json:
        console.print_json(json.dumps(data))
        return
    table = Table("version", "stage", "parent", "created", "gate win", "KL", "reward model", "serving")
    for v in data["data"]:
        gate = v.get("gate") or {}
        table.add_row(v["version"], v["stage"], v["parent"] or "-", v["created"][:19].replace("T", " "),
                      _fmt(gate.get("win_rate"), 2), _fmt(gate.get("kl"), 3), v.get("reward_model") or "-",
                      "yes" if v["serving"] else "")
    console.print(table)
    status = _call("GET", "/admin/rollout", url)
    _print_rollout(status)


@models_app.command("show")
def show(version: Annotated[str, typer.Argument(help="e.g. v3")], url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """One version: manifest metrics, lineage and its audit trail."""
    data = _call("GET", f"/admin/versions/{version}", url)
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(f"[bold]{data['version']}[/bold]  stage {data['stage']} ({data['stage_reason']})")
    console.print(f"lineage: {' ← '.join(data['lineage'])}")
    console.print(f"created {data['created']}, {data['size_bytes'] / 1e6:.1f} MB, reward model "
                  f"{data.get('reward_model') or '-'}, path {data['path']}")
    for title in ("gate", "training"):
        if data.get(title):
            console.print(f"{title}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in data[title].items()))
    table = Table("when", "action", "from", "to", "who", "why")
    for e in data["audit"]:
        table.add_row(e["at"][:19].replace("T", " "), e["action"], e["from_stage"] or "-", e["to_stage"] or "-",
                      e["who"], e["why"])
    console.print(table)


@models_app.command("canary")
def canary(
    version: Annotated[str, typer.Argument(help="version to serve beside the champion")],
    fraction: Annotated[float, typer.Option("--fraction", "-f", min=0.0, max=1.0,
                                            help="share of users (sticky per user)")] = 0.1,
    reason: ReasonOpt = "", url: UrlOpt = None, as_json: JsonOpt = False,
) -> None:
    """Serve VERSION to a fraction of users; pairs become champion vs canary."""
    status = _call("POST", "/admin/rollout", url,
                   {"version": version, "fraction": fraction, "reason": reason, "who": _who()})
    console.print_json(json.dumps(status)) if as_json else _print_rollout(status)


@models_app.command("promote")
def promote(
    version: Annotated[str | None, typer.Argument(help="default: the running canary")] = None,
    reason: ReasonOpt = "", url: UrlOpt = None, as_json: JsonOpt = False,
) -> None:
    """Make VERSION (or the canary) the champion; returns once its weights serve."""
    status = _call("POST", "/admin/promote", url, {"version": version, "reason": reason, "who": _who()})
    console.print_json(json.dumps(status)) if as_json else _print_rollout(status)


@models_app.command("rollback")
def rollback(reason: ReasonOpt = "", url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Withdraw the canary, or return to the previous champion."""
    status = _call("POST", "/admin/rollback", url, {"reason": reason, "who": _who()})
    console.print_json(json.dumps(status)) if as_json else _print_rollout(status)


@models_app.command("import")
def import_(
    directory: Annotated[Path, typer.Argument(help="Hugging Face folder trained elsewhere (safetensors)")],
    reason: ReasonOpt = "", as_json: JsonOpt = False,
) -> None:
    """Register DIR as a candidate version (checked like any version); then canary it against the champion."""
    from kaizen.core.model_events import emit
    from kaizen.core.registry import Registry
    from kaizen.core.registry_schema import RegistryError

    settings = get_settings()
    registry = Registry(settings.registry_path)
    try:
        m = registry.import_folder(directory, who=_who(), why=reason)
    except RegistryError as exc:
        err.print(f"[bold red]refused:[/bold red] {exc}")
        raise typer.Exit(1) from None
    # best effort: the chat API also polls the registry
    emit(settings, "published", m.version, who=_who(), source=m.source, imported=True)
    if as_json:
        console.print_json(m.model_dump_json())
        return
    size = sum(f.size for f in m.files.values())
    console.print(f"imported {m.source} as [bold]{m.version}[/bold] (candidate): {len(m.files)} files, "
                  f"{size / 1e6:.1f} MB, sha256 of every file checked after the copy")
    console.print(f"try it on live votes: kaizen models canary {m.version} --fraction 0.1 -m \"why\"")


DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="say what would be done; change nothing")]


@models_app.command("gc")
def gc(dry_run: DryRunOpt = False, as_json: JsonOpt = False) -> None:
    """Retention: delete rejected versions, retired ones older than the kept champions, old reward models."""
    from trainer.upkeep import collect_garbage

    plan = collect_garbage(get_settings(), dry_run=dry_run, who=_who())
    if as_json:
        console.print_json(json.dumps(plan.as_dict()))
        return
    table = Table("name", "kind", "", "why")
    for kind, deleted, kept in (("version", plan.versions, plan.kept),
                                ("reward model", plan.reward_models, plan.kept_reward_models)):
        for name, why in deleted.items():
            table.add_row(name, kind, "[red]delete[/red]", why)
        for name, why in kept.items():
            table.add_row(name, kind, "keep", why)
    console.print(table)
    verb = "would free" if dry_run else "freed"
    console.print(f"{len(plan.versions)} versions and {len(plan.reward_models)} reward models: "
                  f"{verb} {plan.bytes_freed / 1e6:.1f} MB")


@models_app.command("repair")
def repair(
    dry_run: DryRunOpt = False, as_json: JsonOpt = False,
    champion: Annotated[str | None, typer.Option(
        "--champion", help="with no audit log and no good copy left: the version that serves")] = None,
) -> None:
    """Rebuild an unreadable registry state.json from its last good copy or audit log, and write it."""
    from kaizen.core.registry import Registry
    from kaizen.core.registry_schema import RegistryError
    from kaizen.core.registry_repair import repair as do_repair

    registry = Registry(get_settings().registry_path)
    try:
        result = do_repair(registry, who=_who(), dry_run=dry_run, champion=champion)
    except RegistryError as exc:
        err.print(f"[bold red]cannot repair:[/bold red] {exc}")
        raise typer.Exit(1) from None
    state = result.state
    if as_json:
        console.print_json(json.dumps({"needed": result.needed, "written": result.written,
                                       "source": result.source, "damaged_copy": result.damaged_copy,
                                       "state": state.model_dump(mode="json")}))
        return
    if not result.needed:
        console.print(f"nothing to repair: {result.source} ({registry.state_file})")
        return
    what = (f"champion {state.champion}, canary {state.canary or '-'}, {len(state.versions)} versions, "
            f"generation {state.generation}")
    if result.written:
        console.print(f"rebuilt {registry.state_file} from {result.source}: {what}; the damaged file is "
                      f"{result.damaged_copy}")
    else:
        console.print(f"would rebuild {registry.state_file} from {result.source}: {what}")
