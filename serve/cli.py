"""``fleet``: validate agents and configs, export the manifest schema, bring a fleet up,
show a tenant's spend (``fleet usage``), decide on gated calls (``fleet approvals``).

``fleet up`` is what the README's first command runs: it starts a local Ray cluster
(unless a dashboard already answers at ``FLEET_DASHBOARD_ADDRESS``), deploys the config with ``serve deploy`` (the
very path a platform team uses), and waits, showing progress, until the fleet answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, get_args
from urllib.parse import quote

import click
import httpx
import yaml
from pydantic import ValidationError

from serve.app import validate_fleet
from serve.approvals.records import Status as ApprovalStatus
from serve.approvals.service import OPERATOR, OPERATOR_ID
from serve.audit.log import audit_key, verify
from serve.auth import hash_key
from serve.errors import ConfigError, RequestError
from serve.lifecycle.evals import EVALS_FILE, EvalSuite, load_suite
from serve.lifecycle.local import local_fleet
from serve.lifecycle.runner import (
    KINDS,
    FleetApi,
    Kind,
    junit_xml,
    print_progress,
    run_suites,
    scripted_rules,
    summary,
)
from serve.manifest import load_agent, manifest_json_schema
from serve.placement import audit_path, project_root
from serve.policy.schema import policy_input_json_schema
from serve.settings import settings
from serve.telemetry.alerts import APPROVALS_ALERT_AFTER_S, SOFT_THRESHOLD, alert_rules, dashboard
from serve.tools import load_tools

__all__ = ["main", "serve_details", "validate_config", "wait_running"]

BUILDER = "serve.app:build_app"
BIN = Path(sys.executable).parent


def validate_config(path: Path) -> list[str]:
    """Validate a Ray Serve config and every Fleet application in it; returns app names."""
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(exc), file=str(path)) from None
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(err["msg"], file=str(path), field=".".join(map(str, err["loc"]))) from None
    names = []
    # Ray binds 0.0.0.0 when a config names no host: beyond loopback, keys are then required.
    host = config.http_options.host
    for i, app in enumerate(config.applications):
        if app.import_path != BUILDER:
            continue
        try:
            validate_fleet(app.args or {}, host)
        except ConfigError as exc:
            if exc.file is None:  # an error in the config itself: say which file and app
                raise ConfigError(str(exc), file=str(path), field=f"applications[{i}]") from None
            raise
        names.append(app.name)
    return names


@click.group()
def main() -> None:
    """Fleet: enterprise AI agents on Ray Serve."""


@main.command()
@click.argument("configs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--agents-dir", type=click.Path(path_type=Path), default=None, help="Also check every agent folder here."
)
def validate(configs: tuple[Path, ...], agents_dir: Path | None) -> None:
    """Check deploy configs (default: configs/*.yaml) and the agents they name."""
    try:
        if agents_dir is not None:
            for folder in sorted(p for p in agents_dir.iterdir() if (p / "agent.yaml").exists()):
                spec = load_agent(folder)
                load_tools(folder, [t.name for t in spec.manifest.tools])
                click.echo(f"ok  {folder}")
        paths = configs or tuple(sorted(Path("configs").glob("*.yaml")))
        if not paths and agents_dir is None:
            raise ConfigError("no configs given and none found in ./configs (run it from the checkout)")
        for path in paths:
            apps = validate_config(path)
            click.echo(f"ok  {path} ({', '.join(apps) or 'no Fleet applications'})")
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None)
@click.option("--policy-input", is_flag=True, help="The policy input document's schema instead.")
def schema(output: Path | None, policy_input: bool) -> None:
    """Print (or write) the JSON Schema of agent.yaml (or of the policy input)."""
    doc = policy_input_json_schema() if policy_input else manifest_json_schema()
    text = json.dumps(doc, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


def _fleet_of(config: Path) -> tuple[dict[str, Any], float, float]:
    """The agents of a deploy config's Fleet applications, the budgets' soft threshold and
    how long approvals may wait before an alert (the lowest, if its applications set several)."""
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    specs: dict[str, Any] = {}
    thresholds, waits = [], []
    for app in raw.get("applications", []):
        if app.get("import_path") == BUILDER:
            fleet, _, agents = validate_fleet(app.get("args") or {})
            specs.update(agents)
            thresholds.append(fleet.budgets.soft_threshold)
            waits.append(fleet.approvals.alert_after_s)
    return specs, min(thresholds, default=SOFT_THRESHOLD), min(waits, default=APPROVALS_ALERT_AFTER_S)


def _write(doc: Any, output: Path | None, as_yaml: bool) -> None:
    text = yaml.safe_dump(doc, sort_keys=False, width=200) if as_yaml else json.dumps(doc, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


@main.command()
@click.option(
    "--config", type=click.Path(path_type=Path), default=Path("configs/local.yaml"), show_default=True
)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None)
def alerts(config: Path, output: Path | None) -> None:
    """Prometheus alerting rules from the agents' SLAs (and tool-quality, budget and approval rules)."""
    _write(alert_rules(*_fleet_of(config)), output, as_yaml=True)


@main.command("dashboard")
@click.option(
    "--config", type=click.Path(path_type=Path), default=Path("configs/local.yaml"), show_default=True
)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None)
def dashboard_command(config: Path, output: Path | None) -> None:
    """A Grafana dashboard of the fleet (JSON)."""
    _write(dashboard(*_fleet_of(config)), output, as_yaml=False)


USAGE_COLUMNS = ("budget", "period", "spent USD", "held USD", "limit USD", "remaining USD", "% used")


def _api_url(url: str, path: str) -> str:
    """``--url`` names the fleet (``http://host:8000``, or one under a prefix:
    ``http://host:8000/test``), or its OpenAI base URL (``.../v1``); ``path`` follows ``/v1``."""
    return url.rstrip("/").removesuffix("/v1") + "/v1" + path


def _usage_url(url: str) -> str:
    return _api_url(url, "/usage")


def _fetch_usage(url: str, api_key: str | None) -> dict[str, Any]:
    """``GET /v1/usage``'s body; a one-line error if no answer or an error came back."""
    return _call_fleet("GET", url, api_key, listed=True)


def _call_fleet(
    method: str,
    url: str,
    api_key: str | None,
    *,
    listed: bool = False,
    params: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """A Fleet API call's JSON object (``listed``: a list object); a one-line error if no
    answer or an error came back. The key is sent as a bearer key, and never shown."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.request(method, url, headers=headers, params=params, json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"could not reach Fleet at {url}: {exc or type(exc).__name__}") from None
    try:
        got = response.json()
    except ValueError:
        got = None
    if (
        response.status_code == 200
        and isinstance(got, dict)
        and (not listed or isinstance(got.get("data"), list))
    ):
        return got
    _refused(url, response, got)


def _refused(url: str, response: httpx.Response, body: Any) -> NoReturn:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:  # the OpenAI error envelope
        why = f"{error.get('code') or error.get('type')}: {error['message']}"
    else:
        why = response.text.strip()[:200] or "no body"
    raise click.ClickException(f"{url} answered HTTP {response.status_code} ({why})")


def _used(row: dict[str, Any]) -> str:
    if row.get("limit_usd") is None:
        return "-"
    limit, used = Decimal(row["limit_usd"]), Decimal(row["spent_usd"]) + Decimal(row["held_usd"])
    return "100.0" if limit <= 0 else f"{used / limit * 100:.1f}"


def _usage_table(rows: list[dict[str, Any]]) -> str:
    """Budget and period left-aligned, amounts (USD, exact as the ledger has them) right-aligned."""
    amounts = ("spent_usd", "held_usd", "limit_usd", "remaining_usd")
    cells = [[r["budget"], r["period"], *(r.get(a) or "-" for a in amounts), _used(r)] for r in rows]
    table = [list(USAGE_COLUMNS), *cells]
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]

    def line(row: list[str]) -> str:
        cols = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cols).rstrip()

    return "\n".join(map(line, table))


@main.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The fleet's address.")
@click.option(
    "--api-key",
    envvar=["FLEET_API_KEY", "OPENAI_API_KEY"],
    show_envvar=True,
    default=None,
    help="A tenant's key (sent as a bearer key); none if the fleet has no keys.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the response as JSON instead of a table.")
def usage(url: str, api_key: str | None, as_json: bool) -> None:
    """Spend, held and remaining per budget and period (GET /v1/usage): a tenant's own, or
    every budget with a key of role admin."""
    body = _fetch_usage(_usage_url(url), api_key)
    if as_json:
        click.echo(json.dumps(body, indent=2))
    elif not body["data"]:
        click.echo("no budget has been charged yet")
    else:
        click.echo(_usage_table(body["data"]))


# -- fleet eval --------------------------------------------------------------------------


@main.command("eval")
@click.argument("agents", nargs=-1)
@click.option("--url", default=None, help="A running fleet's address (e.g. http://127.0.0.1:8000).")
@click.option(
    "--api-key",
    envvar=["FLEET_API_KEY", "OPENAI_API_KEY"],
    show_envvar=True,
    default=None,
    help="A key the fleet takes (sent as a bearer key); none if it has no keys.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Start this deploy config's fleet here instead (a local cluster; its scripted backends "
    "play the suites' scripts), and stop it after.",
)
@click.option("--scripted", is_flag=True, help="The --url fleet plays the suites' scripts (a CI fleet).")
@click.option("--agents-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("agents"))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON results.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JUnit XML.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option(
    "--kind", "kinds", type=click.Choice(KINDS), multiple=True, help="Only these kinds of cases (repeatable)."
)
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="Sent with every request.")
def eval_command(
    agents: tuple[str, ...],
    url: str | None,
    api_key: str | None,
    config_path: Path | None,
    scripted: bool,
    agents_dir: Path,
    output: Path | None,
    junit: Path | None,
    concurrency: int,
    kinds: tuple[Kind, ...],
    max_tokens: int | None,
) -> None:
    """Run agents' eval suites (agents/<name>/evals.yaml; all of them if no AGENT is named)
    against a fleet. Exit status 1 when a suite falls below a threshold."""
    if (url is None) == (config_path is None):
        raise click.UsageError("give one of --url (a running fleet) and --config (start one)")
    suites = _suites(agents_dir, agents)
    try:
        with contextlib.ExitStack() as stack:
            if config_path is not None:
                url = stack.enter_context(local_fleet(config_path, scripted_rules(suites)))
                scripted = True
            assert url is not None
            api = FleetApi(url, api_key, max_tokens=max_tokens)
            stack.callback(api.close)
            run = run_suites(
                api,
                suites,
                scripted=scripted,
                concurrency=concurrency,
                progress=print_progress,
                target=url,
                kinds=kinds or KINDS,
            )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"the fleet at {url} did not answer: {exc}") from None
    except (ConfigError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary(run))
    if output is not None:
        output.write_text(json.dumps(run.as_json(), indent=2) + "\n")
    if junit is not None:
        junit.write_text(junit_xml(run))
    if not run.passed:
        sys.exit(1)


def _suites(agents_dir: Path, names: tuple[str, ...]) -> list[EvalSuite]:
    folders = [agents_dir / n for n in names] or sorted(p.parent for p in agents_dir.glob(f"*/{EVALS_FILE}"))
    suites = []
    for folder in folders:
        try:
            suite = load_suite(folder)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        if suite is None:
            raise click.UsageError(f"{folder}/{EVALS_FILE} does not exist")
        suites.append(suite)
    if not suites:
        raise click.UsageError(f"no agent in {agents_dir} has an {EVALS_FILE}")
    return suites


# -- fleet approvals ----------------------------------------------------------------------

APPROVAL_COLUMNS = ("id", "agent", "tool", "requester", "age", "expires", "status")


def _now() -> float:
    """What ages and expiries are counted from (a test holds it still)."""
    return time.time()


def _span(seconds: float) -> str:
    """A span as people read it, to the two largest units: 45s, 12m, 3h05m, 2d04h."""
    s = int(max(seconds, 0))
    days, hours, minutes = s // 86_400, s % 86_400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m" if minutes else f"{s}s"


def _expiry(approval: dict[str, Any], now: float) -> str:
    if approval["status"] != "pending":
        return "-"
    left = approval["expires_at"] - now
    return f"in {_span(left)}" if left > 0 else "now"


def _approvals_table(rows: list[dict[str, Any]], now: float) -> str:
    cells = [
        [
            a["id"],
            a["agent"],
            a["tool"],
            a["requester"],
            _span(now - a["created_at"]),
            _expiry(a, now),
            a["status"],
        ]
        for a in rows
    ]
    table = [list(APPROVAL_COLUMNS), *cells]
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


def _when(at: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f"{stamp} ({_span(now - at)} ago)" if at <= now else f"{stamp} (in {_span(at - now)})"


def _answer(result: dict[str, Any]) -> str:
    """The request's answer: its chat completion's message content."""
    choices = result.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) else json.dumps(content)


def _approval_lines(a: dict[str, Any], now: float) -> str:
    lines = [
        ("id", a["id"]),
        ("status", a["status"]),
        ("agent", f"{a['agent']} {a['agent_version']}"),
        ("tool", a["tool"]),
        ("arguments", json.dumps(a["arguments"], ensure_ascii=False)),
        ("requester", f"{a['requester']} (tenant {a['tenant']})"),
        ("request", a["request_id"]),
        ("created", _when(a["created_at"], now)),
        ("expires", _when(a["expires_at"], now)),
    ]
    decision = a.get("decision")
    if decision is not None:
        lines.append(("decision", f"{decision['outcome']} by {decision['by']}, {_when(decision['at'], now)}"))
        if decision.get("reason"):
            lines.append(("reason", decision["reason"]))
    if a.get("result") is not None:
        lines.append(("result", _answer(a["result"])))
    width = max(len(k) for k, _ in lines) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in lines)


class _HttpApprovals:
    """The approvals routes of the fleet at ``url``, as the key's principal."""

    def __init__(self, url: str, api_key: str) -> None:
        self._url, self._key = url, api_key

    def inbox(self, status: str | None, agent: str | None) -> dict[str, Any]:
        params = {k: v for k, v in (("status", status), ("agent", agent)) if v is not None}
        return _call_fleet("GET", _api_url(self._url, "/approvals"), self._key, listed=True, params=params)

    def get(self, approval_id: str, wait_s: float) -> dict[str, Any]:
        params = {"wait": f"{wait_s:g}"} if wait_s else None
        url = _api_url(self._url, f"/approvals/{quote(approval_id, safe='')}")
        return _call_fleet("GET", url, self._key, params=params, timeout_s=10.0 + wait_s)

    def decide(self, approval_id: str, approve: bool, reason: str | None) -> dict[str, Any]:
        url = _api_url(
            self._url, f"/approvals/{quote(approval_id, safe='')}/{'approve' if approve else 'reject'}"
        )
        return _call_fleet("POST", url, self._key, body={} if reason is None else {"reason": reason})


class _OperatorApprovals:
    """The approvals service itself, reached through Ray as the cluster's operator (who
    holds the cluster's token): how approvals are decided when the fleet has no keys."""

    def __init__(self, app: str) -> None:
        import ray
        from ray import serve as rayserve

        # RAY_AUTH_MODE is left as the shell has it: unset, Ray turns token auth on by itself
        # when ~/.ray/auth_token exists, and setting it now (Ray is imported) breaks the connection.
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # a handle's routing news is noise here
        try:
            if not ray.is_initialized():
                # ERROR: its "token authentication is enabled" warning on every command is noise
                ray.init(address="auto", log_to_driver=False, logging_level=logging.ERROR)
            self._handle = rayserve.get_deployment_handle("approvals", app_name=app)
        except Exception as exc:  # no cluster, no Serve, no such application
            raise click.ClickException(
                f"could not reach the approvals service of application {app!r} through Ray "
                f"({type(exc).__name__}: {_first_line(exc)}); give --api-key to use the fleet's HTTP API"
            ) from None

    def inbox(self, status: str | None, agent: str | None) -> dict[str, Any]:
        rows = self._call("inbox", OPERATOR, OPERATOR_ID, status, agent)
        return {"object": "list", "data": rows}

    def get(self, approval_id: str, wait_s: float) -> dict[str, Any]:
        got: dict[str, Any] = self._call(
            "get", approval_id, OPERATOR, OPERATOR_ID, wait_s, timeout_s=30.0 + wait_s
        )
        return got

    def decide(self, approval_id: str, approve: bool, reason: str | None) -> dict[str, Any]:
        got: dict[str, Any] = self._call("decide", approval_id, approve, OPERATOR, OPERATOR_ID, reason)
        return got

    def _call(self, method: str, *args: Any, timeout_s: float = 30.0) -> Any:
        try:
            got = getattr(self._handle, method).remote(*args).result(timeout_s=timeout_s)
        except Exception as exc:
            raise click.ClickException(
                f"the approvals service did not answer ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        if isinstance(got, RequestError):
            raise click.ClickException(f"{got.code or got.type}: {got.message}")
        return got


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _approvals_of(url: str, api_key: str | None, app: str) -> _HttpApprovals | _OperatorApprovals:
    return _HttpApprovals(url, api_key) if api_key else _OperatorApprovals(app)


def _approval_options(command: Callable[..., None]) -> Callable[..., None]:
    """What every ``fleet approvals`` command takes: where the fleet is, and as whom."""
    options = [
        click.option(
            "--url", default="http://127.0.0.1:8000", show_default=True, help="The fleet's address."
        ),
        click.option(
            "--api-key",
            envvar="FLEET_API_KEY",
            show_envvar=True,
            default=None,
            help="A key to act with over HTTP; without one, act as the cluster's operator through Ray.",
        ),
        click.option(
            "--app", default="fleet", show_default=True, help="The Fleet application (without --api-key)."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON instead."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.group()
def approvals() -> None:
    """Gated calls that wait for a person: list, show, approve, reject.

    With --api-key (or FLEET_API_KEY) through the fleet's /v1/approvals as that key's
    principal; without one, as the cluster's operator, through Ray (whoever may reach
    the cluster: with auth off, the only way to decide on someone's request)."""


@approvals.command("list")
@_approval_options
@click.option(
    "--status",
    type=click.Choice([*get_args(ApprovalStatus), "all"]),
    default="pending",
    show_default=True,
    help="Only approvals in this state (all: any).",
)
@click.option("--agent", default=None, help="Only this agent's approvals.")
def approvals_list(
    url: str, api_key: str | None, app: str, as_json: bool, status: str, agent: str | None
) -> None:
    """The approvals you may see (yours, and those you may decide), newest first."""
    body = _approvals_of(url, api_key, app).inbox(None if status == "all" else status, agent)
    if as_json:
        click.echo(json.dumps(body, indent=2))
    elif not body["data"]:
        click.echo(f"no approvals{'' if status == 'all' else ' ' + status}")
    else:
        click.echo(_approvals_table(body["data"], _now()))


@approvals.command("show")
@_approval_options
@click.argument("approval_id")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Wait up to N seconds while it is pending or running (the fleet allows up to approvals.max_wait_s).",
)
def approvals_show(
    url: str, api_key: str | None, app: str, as_json: bool, approval_id: str, wait_s: float
) -> None:
    """One approval; once its request finished, the request's answer."""
    got = _approvals_of(url, api_key, app).get(approval_id, wait_s)
    click.echo(json.dumps(got, indent=2) if as_json else _approval_lines(got, _now()))


def _decide(
    url: str,
    api_key: str | None,
    app: str,
    as_json: bool,
    approval_id: str,
    approve: bool,
    reason: str | None,
) -> None:
    got = _approvals_of(url, api_key, app).decide(approval_id, approve, reason)
    if as_json:
        click.echo(json.dumps(got, indent=2))
    else:
        click.echo(f"{got['status']} {got['id']}: {got['agent']} {got['tool']}, asked by {got['requester']}")


REASON = click.option("--reason", default=None, help="Why (kept in the approval and its audit trail).")


@approvals.command("approve")
@_approval_options
@click.argument("approval_id")
@REASON
def approvals_approve(
    url: str, api_key: str | None, app: str, as_json: bool, approval_id: str, reason: str | None
) -> None:
    """Approve a gated call: its turn resumes and the call runs, once."""
    _decide(url, api_key, app, as_json, approval_id, True, reason)


@approvals.command("reject")
@_approval_options
@click.argument("approval_id")
@REASON
def approvals_reject(
    url: str, api_key: str | None, app: str, as_json: bool, approval_id: str, reason: str | None
) -> None:
    """Reject a gated call: its turn resumes and the model is told the call was refused."""
    _decide(url, api_key, app, as_json, approval_id, False, reason)


@main.group()
def audit() -> None:
    """Read the audit log."""


@audit.command("verify")
@click.argument("log", type=click.Path(path_type=Path), required=False)
@click.option(
    "--config", type=click.Path(path_type=Path), default=Path("configs/local.yaml"), show_default=True
)
def audit_verify(log: Path | None, config: Path) -> None:
    """Check the hash chain and checkpoint; exit 1 at the first bad record."""
    try:
        path = log or _audit_log_of(config)
        if not path.exists():
            raise ConfigError("no audit log here", file=str(path))
        report = verify(path, audit_key(path, settings().audit_key, create=False))
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if report.ok:
        click.echo(f"ok  {path}: {report.records} records, chain and checkpoint intact")
        return
    where = f"record {report.first_bad}" if report.first_bad is not None else "checkpoint"
    click.echo(f"TAMPERED  {path}: {where}: {report.problem}", err=True)
    sys.exit(1)


def _audit_log_of(config: Path) -> Path:
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    for app in raw.get("applications", []):
        if app.get("import_path") == BUILDER:
            fleet, *_ = validate_fleet(app.get("args") or {})
            return audit_path(fleet.governance.audit)
    raise ConfigError("no Fleet application in this config", file=str(config))


@main.group()
def keys() -> None:
    """Tenant API keys."""


@keys.command("new")
@click.option("--tenant", required=True, help="Tenant the key belongs to.")
@click.option("--role", "roles", multiple=True, help="A role policies will see (repeatable).")
def keys_new(tenant: str, roles: tuple[str, ...]) -> None:
    """Make a key: prints it once, and the config entry that stores only its hash."""
    key = "fk-" + secrets.token_urlsafe(32)
    entry = {"tenant": tenant, "key_sha256": hash_key(key), "roles": list(roles)}
    click.echo(f"API key (shown once, give it to the tenant): {key}", err=True)
    click.echo(yaml.safe_dump({"tenants": [entry]}, sort_keys=False), nl=False)


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, check=False, **kwargs)


def _ensure_cluster(http_port: int) -> bool:
    """Use the cluster whose dashboard answers, else start one; True if this started it."""
    try:
        serve_details()
    except Exception:  # no dashboard answers there: start a cluster
        pass
    else:
        click.echo(f"Ray: using the cluster whose dashboard is {settings().dashboard_address}")
        return False
    _check_ports(
        {6379: "Ray's GCS", 8265: "Ray's dashboard", settings().metrics_port: "metrics", http_port: "HTTP"}
    )
    click.echo("Ray: starting a local cluster (ray start --head) ...")
    _ensure_auth_token()
    metrics = f"--metrics-export-port={settings().metrics_port}"  # Prometheus scrapes /metrics here
    done = _run(
        [str(BIN / "ray"), "start", "--head", "--dashboard-host=127.0.0.1", "--disable-usage-stats", metrics]
    )
    if done.returncode != 0:
        raise click.ClickException(f"ray start failed:\n{done.stderr[-2000:]}")
    return True


def _check_ports(ports: dict[int, str]) -> None:
    """Fail in one line, naming the port, if another program holds one the cluster needs."""
    for port, what in ports.items():
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise click.ClickException(
                    f"port {port} ({what}) is in use by another program and no Ray dashboard answers at "
                    f"{settings().dashboard_address}: stop that program, or set FLEET_DASHBOARD_ADDRESS "
                    "to the cluster it belongs to"
                )


def _ensure_auth_token() -> None:
    """Make Ray's token (``~/.ray/auth_token``, owner-only) if this machine has none.

    Ray 2.60 turns token auth on for new local clusters, and ``ray start --head`` refuses
    to start without a token; only ``ray.init`` makes one by itself. The command prints
    the token: it is read here and dropped, never echoed."""
    token = Path.home() / ".ray" / "auth_token"
    existed = token.exists()
    done = _run([str(BIN / "ray"), "get-auth-token", "--generate"])
    if done.returncode != 0:
        raise click.ClickException(f"could not make Ray's auth token:\n{done.stderr[-2000:]}")
    if not existed and token.exists():  # Ray writes it world-readable
        token.chmod(0o600)


def _up_state() -> Path:
    """What ``fleet up`` started, so that ``fleet down`` stops that and nothing else."""
    return project_root() / "var" / "fleet-up.json"


def serve_details(dashboard: str | None = None) -> dict[str, Any]:
    """``GET /api/serve/applications/`` (Ray's client adds the cluster's auth token)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(dashboard or settings().dashboard_address)
    details: dict[str, Any] = client.get_serve_details()
    return details


def wait_running(apps: list[str], timeout_s: float, dashboard: str | None = None) -> None:
    """Poll the dashboard until every app is RUNNING, printing each change of state."""
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            details = serve_details(dashboard).get("applications", {})
        except Exception:  # the dashboard is still starting, or restarting
            details = {}
        states = {a: details.get(a, {}).get("status", "NOT_STARTED") for a in apps}
        for app in apps:
            if states[app] == "DEPLOY_FAILED":
                raise click.ClickException(f"application {app} failed:\n{details[app].get('message', '')}")
        line = ", ".join(f"{a}: {s}" for a, s in states.items())
        if line != last:
            click.echo(f"  {time.strftime('%H:%M:%S')} {line}")
            last = line
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(2)
    raise click.ClickException(f"the fleet was not running after {timeout_s:g}s ({last})")


def _prepare_models(path: Path) -> None:
    """Convert embedded models now, with progress, rather than silently inside a replica."""
    from serve.models import VLLMConfig
    from serve.models.embedded import EMBEDDED_MODELS, ensure_model

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for app in raw.get("applications", []):
        if app.get("import_path") != BUILDER:
            continue
        for name, model in (app.get("args") or {}).get("models", {}).items():
            if model.get("kind") == "vllm" and VLLMConfig.model_validate(model).model in EMBEDDED_MODELS:
                click.echo(f"Model {name}: preparing the embedded model ...")
                click.echo(f"Model {name}: {ensure_model()}")


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("configs/local.yaml"))
@click.option("--timeout", "timeout_s", type=float, default=900.0, help="Seconds to wait for the fleet.")
def up(config_path: Path, timeout_s: float) -> None:
    """Start a local Ray cluster (if none) and deploy CONFIG with `serve deploy`."""
    try:
        apps = validate_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    _prepare_models(config_path)
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    http = raw.get("http_options", {})
    state = _up_state()
    before = json.loads(state.read_text()) if state.exists() else {}
    started = _ensure_cluster(int(http.get("port", 8000)))
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(
        json.dumps({"started_cluster": started or bool(before.get("started_cluster")), "apps": apps})
    )
    click.echo(f"Deploying {config_path} (serve deploy) ...")
    deploy = _run([str(BIN / "serve"), "deploy", str(config_path), "-a", settings().dashboard_address])
    if deploy.returncode != 0:
        raise click.ClickException(f"serve deploy failed:\n{deploy.stderr[-2000:]}")
    wait_running(apps, timeout_s)
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    click.echo(f"Fleet is up: {base}/v1  (agents: GET {base}/v1/models; stop: make down)")


@main.command()
def down() -> None:
    """Stop what `fleet up` started: its applications, and the local Ray cluster if it made it."""
    state = _up_state()
    if not state.exists():
        click.echo("fleet up started nothing here (no var/fleet-up.json): nothing stopped")
        return
    started = bool(json.loads(state.read_text()).get("started_cluster"))
    _run([str(BIN / "serve"), "shutdown", "-y", "-a", settings().dashboard_address])
    if started:
        done = _run([str(BIN / "ray"), "stop"])
        click.echo("Ray stopped" if done.returncode == 0 else done.stderr[-500:])
    else:
        click.echo("Fleet's applications removed; the Ray cluster was not started by fleet up and runs on")
    state.unlink()


if __name__ == "__main__":
    main()
