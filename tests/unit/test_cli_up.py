"""`fleet up` / `fleet down` on a new machine and beside a running cluster, with Ray's commands recorded.

Ray itself is not started: `ray`, `serve` and the dashboard are replaced by recorders, so
these tests read what the CLI would run and what it leaves behind.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from serve import cli
from tests.unit.conftest import LOCAL_CONFIG


class Machine:
    """What the CLI ran, and the answers it got; a dashboard that answers or not."""

    def __init__(self, dashboard_up: bool) -> None:
        self.dashboard_up = dashboard_up
        self.ran: list[list[str]] = []

    def run(self, cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        self.ran.append([Path(cmd[0]).name, *cmd[1:]])
        if cmd[1:3] == ["get-auth-token", "--generate"]:
            token = Path.home() / ".ray" / "auth_token"
            token.parent.mkdir(exist_ok=True)
            token.write_text("t" * 64)
            token.chmod(0o644)  # as Ray writes it
            return subprocess.CompletedProcess(cmd, 0, "t" * 64 + "\n", "")
        if cmd[1:3] == ["start", "--head"]:
            self.dashboard_up = True
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def details(self, dashboard: str | None = None) -> dict[str, Any]:
        if not self.dashboard_up:
            raise ConnectionError("no dashboard")
        return {"applications": {"fleet": {"status": "RUNNING"}}}

    def commands(self) -> list[str]:
        return [" ".join(c[:2]) for c in self.ran]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.setattr(cli, "_up_state", lambda: tmp_path / "var" / "fleet-up.json")
    monkeypatch.setattr(cli, "_prepare_models", lambda path: None)
    monkeypatch.setattr(cli, "_check_ports", lambda ports: None)  # this machine's own ports: not the test's
    yield tmp_path / "home"


def machine(monkeypatch: pytest.MonkeyPatch, dashboard_up: bool) -> Machine:
    m = Machine(dashboard_up)
    monkeypatch.setattr(cli, "_run", m.run)
    monkeypatch.setattr(cli, "serve_details", m.details)
    return m


def fleet(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


def test_up_on_a_machine_that_never_ran_ray_makes_an_owner_only_token_first(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = machine(monkeypatch, dashboard_up=False)
    result = fleet("up", "--config", str(LOCAL_CONFIG), "--timeout", "5")
    assert result.exit_code == 0, result.output
    assert m.commands()[:3] == ["ray get-auth-token", "ray start", "serve deploy"]
    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    assert "t" * 64 not in result.output  # the token is never printed


def test_down_stops_the_cluster_up_started(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(monkeypatch, dashboard_up=False)
    assert fleet("up", "--config", str(LOCAL_CONFIG), "--timeout", "5").exit_code == 0
    result = fleet("down")
    assert result.exit_code == 0, result.output
    assert m.commands()[-2:] == ["serve shutdown", "ray stop"]


def test_down_leaves_running_a_cluster_up_did_not_start(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(monkeypatch, dashboard_up=True)
    assert fleet("up", "--config", str(LOCAL_CONFIG), "--timeout", "5").exit_code == 0
    assert "ray start" not in m.commands() and "ray get-auth-token" not in m.commands()
    result = fleet("down")
    assert result.exit_code == 0, result.output
    assert m.commands()[-1] == "serve shutdown" and "ray stop" not in m.commands()
    assert "not started by fleet up" in result.output


def test_down_with_nothing_started_stops_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(monkeypatch, dashboard_up=True)
    result = fleet("down")
    assert result.exit_code == 0 and m.ran == []
    assert "nothing stopped" in result.output


def test_up_checks_the_ports_before_it_starts_ray(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(monkeypatch, dashboard_up=False)

    def taken(ports: dict[int, str]) -> None:
        m.ran.append(["check-ports", *map(str, ports)])
        raise click.ClickException("port 8000 (HTTP) is in use")

    monkeypatch.setattr(cli, "_check_ports", taken)
    result = fleet("up", "--config", str(LOCAL_CONFIG), "--timeout", "5")
    assert result.exit_code != 0 and "port 8000 (HTTP) is in use" in result.output
    assert m.ran[0][0] == "check-ports" and "8000" in m.ran[0] and "ray start" not in m.commands()
    assert not cli._up_state().exists()  # nothing recorded as started


def test_a_port_another_program_holds_is_named_in_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(click.ClickException) as caught:
            cli._check_ports({port: "metrics"})
    message = caught.value.message
    assert f"port {port} (metrics) is in use" in message and "\n" not in message
    cli._check_ports({port: "metrics"})  # released: free again
