"""The `fleet` CLI (click's CliRunner): validate and schema. No Ray cluster is involved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from jsonschema import Draft202012Validator

from serve.cli import main
from tests.unit.conftest import AGENTS, EXAMPLE_AGENTS, LOCAL_CONFIG, ROOT


def fleet(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write_config(tmp_path: Path, change: Any) -> Path:
    config = yaml.safe_load(LOCAL_CONFIG.read_text(encoding="utf-8"))
    change(config["applications"][0]["args"])
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_validate_local_config() -> None:
    result = fleet("validate", str(LOCAL_CONFIG))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok  {LOCAL_CONFIG} (fleet)\n"


def test_validate_defaults_to_configs_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = fleet("validate")
    assert result.exit_code == 0, result.output
    expected = [f"ok  {p.relative_to(ROOT)} (fleet)" for p in sorted((ROOT / "configs").glob("*.yaml"))]
    assert result.stdout.splitlines() == expected
    assert "ok  configs/local.yaml (fleet)" in expected


def test_validate_with_no_config_found_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = fleet("validate")
    assert result.output != ""


def test_validate_agents_dir() -> None:
    result = fleet("validate", "--agents-dir", str(AGENTS), str(LOCAL_CONFIG))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:-1] == [f"ok  {AGENTS / name}" for name in sorted(EXAMPLE_AGENTS)]
    assert lines[-1] == f"ok  {LOCAL_CONFIG} (fleet)"


def test_validate_config_naming_a_missing_agent(tmp_path: Path) -> None:
    path = write_config(tmp_path, lambda args: args["agents"].append("ghost"))
    result = fleet("validate", str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {path}: applications[0]: no agent 'ghost': "
        f"{str(ROOT / 'agents' / 'ghost' / 'agent.yaml')!r} not found\n"
    )


def test_validate_config_with_broken_args(tmp_path: Path) -> None:
    path = write_config(tmp_path, lambda args: args.pop("models"))
    result = fleet("validate", str(path))
    assert result.exit_code == 1
    assert result.stderr == f"error: {path}: applications[0]: args.models: Field required\n"


def test_validate_names_the_broken_manifest(tmp_path: Path) -> None:
    agents = tmp_path / "agents"
    shutil.copytree(AGENTS, agents)
    manifest = agents / "hr-policy-advisor" / "agent.yaml"
    data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    data["autoscaling"]["min_replicas"] = 9
    manifest.write_text(yaml.safe_dump(data), encoding="utf-8")
    path = write_config(tmp_path, lambda args: args.update(agents_dir=str(agents)))
    result = fleet("validate", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {manifest}: autoscaling: ")
    assert "min_replicas must not exceed max_replicas" in result.stderr


def test_validate_agents_dir_reports_a_broken_agent(tmp_path: Path) -> None:
    agents = tmp_path / "agents"
    shutil.copytree(AGENTS / "orchestrator", agents / "orchestrator")
    (agents / "orchestrator" / "prompt.md").write_text("Hello {{ who }}", encoding="utf-8")
    result = fleet("validate", "--agents-dir", str(agents), str(LOCAL_CONFIG))
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {agents / 'orchestrator' / 'agent.yaml'}: prompt.variables: "
        "template uses undeclared variables ['who']\n"
    )


def test_validate_config_that_ray_rejects(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("applications: 3\n", encoding="utf-8")
    result = fleet("validate", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {path}: applications: ")


def test_validate_config_that_is_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("applications: [\n", encoding="utf-8")
    result = fleet("validate", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {path}: ")


def test_validate_missing_config_file(tmp_path: Path) -> None:
    result = fleet("validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'nope.yaml'}: ")


def test_validate_skips_non_fleet_applications(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(
        yaml.safe_dump(
            {"applications": [{"name": "other", "import_path": "mypkg.app:app", "route_prefix": "/x"}]}
        ),
        encoding="utf-8",
    )
    result = fleet("validate", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok  {path} (no Fleet applications)\n"


def test_schema_is_a_json_schema() -> None:
    result = fleet("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    Draft202012Validator.check_schema(schema)
    assert "apiVersion" in schema["properties"]
    assert {"apiVersion", "name", "version", "role", "description", "owner", "prompt", "sla"} <= set(
        schema["required"]
    )
    assert schema["additionalProperties"] is False


def test_schema_to_file(tmp_path: Path) -> None:
    out = tmp_path / "agent.schema.json"
    result = fleet("schema", "-o", str(out))
    assert result.exit_code == 0
    assert result.stdout == ""
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(fleet("schema").stdout)


def test_readme_schema_file_is_current() -> None:
    shipped = AGENTS / "agent.schema.json"
    assert shipped.is_file()
    assert json.loads(shipped.read_text(encoding="utf-8")) == json.loads(fleet("schema").stdout)


def test_audit_verify_reports_ok_then_the_tampered_record(tmp_path: Path) -> None:
    from serve.audit.log import AuditLog, audit_key

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, audit_key(path))
    log.append([{"request_id": f"r{i}", "outcome": "allow"} for i in range(5)])
    ok = fleet("audit", "verify", str(path))
    assert ok.exit_code == 0 and "5 records" in ok.output
    rows = path.read_bytes().splitlines(keepends=True)
    rows[3] = rows[3].replace(b"allow", b"deny")
    path.write_bytes(b"".join(rows))
    bad = fleet("audit", "verify", str(path))
    assert bad.exit_code == 1 and "record 3" in bad.output and "modified" in bad.output


def test_audit_verify_finds_the_log_from_the_config(tmp_path: Path) -> None:
    log = tmp_path / "x" / "audit.jsonl"
    config = write_config(tmp_path, lambda args: args.update(governance={"audit": {"path": str(log)}}))
    result = fleet("audit", "verify", "--config", str(config))
    assert result.exit_code == 2 and f"{log}: no audit log here" in result.output


def test_keys_new_prints_the_key_once_and_stores_only_its_hash() -> None:
    from serve.auth import authenticate
    from serve.governance.config import GovernanceConfig

    result = CliRunner().invoke(main, ["keys", "new", "--tenant", "acme", "--role", "hr"])
    assert result.exit_code == 0
    key = result.stderr.split(": ")[-1].strip()
    entry = yaml.safe_load(result.stdout)
    assert key not in result.stdout
    config = GovernanceConfig.model_validate(entry)
    assert authenticate(f"Bearer {key}", config.tenants).roles == ["hr"]


def test_policy_input_schema_export() -> None:
    result = fleet("schema", "--policy-input")
    assert json.loads(result.output)["title"] == "Fleet policy input (fleet.policy/v1)"


# --- secure by default ----------------------------------------------------------------


def write_deploy_config(
    tmp_path: Path, http_options: dict[str, Any] | None, governance: dict[str, Any]
) -> Path:
    config = yaml.safe_load(LOCAL_CONFIG.read_text(encoding="utf-8"))
    if http_options is None:
        config.pop("http_options")
    else:
        config["http_options"] = http_options
    config["applications"][0]["args"]["governance"] = governance
    path = tmp_path / "exposed.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("http_options", [{"host": "0.0.0.0", "port": 8000}, None], ids=["0.0.0.0", "unset"])
def test_validate_refuses_serving_beyond_loopback_without_keys(
    tmp_path: Path, http_options: dict[str, Any] | None
) -> None:
    """Ray binds 0.0.0.0 when a config names no host: that is beyond loopback too."""
    path = write_deploy_config(tmp_path, http_options, {})
    result = fleet("validate", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: {path}: applications[0]: args.governance.tenants: http_options.host is '0.0.0.0', "
        "beyond loopback, and governance.tenants lists no API key"
    )
    assert 'set args.governance.auth: "off" to serve without keys on purpose' in result.stderr


def test_validate_accepts_beyond_loopback_with_keys_or_auth_off(tmp_path: Path) -> None:
    exposed = {"host": "0.0.0.0", "port": 8000}
    for governance in (
        {"auth": "off"},
        {"tenants": [{"tenant": "acme", "key_sha256_file": "/run/secrets/k"}]},
    ):
        path = write_deploy_config(tmp_path, exposed, governance)
        result = fleet("validate", str(path))
        assert result.exit_code == 0, result.output


def test_auth_off_unquoted_in_yaml_is_auth_off(tmp_path: Path) -> None:
    path = write_deploy_config(tmp_path, {"host": "0.0.0.0", "port": 8000}, {})
    path.write_text(path.read_text().replace("governance: {}", "governance: {auth: off}"), encoding="utf-8")
    assert "auth: off" in path.read_text()
    assert fleet("validate", str(path)).exit_code == 0


def test_up_refuses_before_it_starts_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import serve.cli as cli

    def started(*_: Any) -> Any:
        raise AssertionError("fleet up went on")

    monkeypatch.setattr(cli, "_ensure_cluster", started)
    monkeypatch.setattr(cli, "_prepare_models", started)
    path = write_deploy_config(tmp_path, {"host": "0.0.0.0", "port": 8000}, {})
    result = fleet("up", "--config", str(path))
    assert result.exit_code == 1
    assert (
        f"{path}: applications[0]: args.governance.tenants: http_options.host is '0.0.0.0'" in result.output
    )
    assert "args.governance.auth" in result.output


def test_the_gpu_config_serves_beyond_loopback_with_keys_required() -> None:
    from serve.app import validate_fleet

    raw = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text(encoding="utf-8"))
    assert raw["http_options"]["host"] == "0.0.0.0"
    fleet_args, *_ = validate_fleet(raw["applications"][0]["args"], raw["http_options"]["host"])
    assert fleet_args.governance.keys_required and fleet_args.governance.auth is None
    assert all(t.key_sha256 is None for t in fleet_args.governance.tenants)  # from the environment or a file


def test_eval_against_a_fleet_that_does_not_answer_says_so(tmp_path: Path) -> None:
    (tmp_path / "clerk").mkdir()
    suite = {"task": [{"id": "t", "input": "hi", "expect": {"status": 200}}]}
    (tmp_path / "clerk" / "evals.yaml").write_text(yaml.safe_dump(suite))
    result = fleet("eval", "--agents-dir", str(tmp_path), "--url", "http://127.0.0.1:9")
    assert result.exit_code == 1 and "the fleet at http://127.0.0.1:9 did not answer" in result.output
    config = str(ROOT / "configs/scripted.yaml")
    both = fleet("eval", "--agents-dir", str(tmp_path), "--url", "http://x", "--config", config)
    assert both.exit_code == 2 and "give one of --url" in both.output
    nobody = fleet("eval", "nobody", "--agents-dir", str(tmp_path), "--url", "http://x")
    assert nobody.exit_code == 2 and "nobody/evals.yaml does not exist" in nobody.output
