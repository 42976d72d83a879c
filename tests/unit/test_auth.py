"""serve.auth: where a key's hash comes from, who a key is, what counts as loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.auth import ANONYMOUS, TenantKey, authenticate, hash_key, identify, is_loopback, resolve_keys
from serve.errors import ConfigError, Unauthorized
from serve.governance.config import GovernanceConfig

DIGEST = hash_key("fk-acme")


def test_a_key_hash_comes_from_exactly_one_source() -> None:
    for sources in ({}, {"key_sha256": DIGEST, "key_sha256_env": "FLEET_KEY_ACME"}):
        with pytest.raises(
            ValidationError, match="exactly one of key_sha256, key_sha256_env, key_sha256_file"
        ):
            TenantKey.model_validate({"tenant": "acme", **sources})
    with pytest.raises(ValidationError, match="key_sha256_env"):
        TenantKey(tenant="acme", key_sha256_env="not a variable")


def test_a_hash_in_the_config_is_used_as_written() -> None:
    key = TenantKey(tenant="acme", key_sha256=DIGEST)
    assert resolve_keys([key]) == [key]


def test_a_hash_from_the_environment_is_read_at_deploy_time(monkeypatch: pytest.MonkeyPatch) -> None:
    key = TenantKey(tenant="acme", key_sha256_env="FLEET_KEY_ACME", roles=["hr"])
    monkeypatch.setenv("FLEET_KEY_ACME", DIGEST.upper() + "\n")
    (resolved,) = resolve_keys([key])
    assert resolved == TenantKey(tenant="acme", key_sha256=DIGEST, roles=["hr"])
    assert authenticate("Bearer fk-acme", [resolved]).tenant == "acme"


def test_an_unset_variable_is_named_with_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_KEY_ACME", raising=False)
    keys = [
        TenantKey(tenant="ops", key_sha256=DIGEST),
        TenantKey(tenant="acme", key_sha256_env="FLEET_KEY_ACME"),
    ]
    with pytest.raises(ConfigError, match="environment variable FLEET_KEY_ACME is not set") as err:
        resolve_keys(keys, "args.governance.tenants")
    assert err.value.field == "args.governance.tenants[1].key_sha256_env"


def test_a_variable_holding_no_hash_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_KEY_ACME", "fk-the-clear-text-key")  # the key, not its hash
    with pytest.raises(ConfigError, match="FLEET_KEY_ACME does not hold a SHA-256") as err:
        resolve_keys([TenantKey(tenant="acme", key_sha256_env="FLEET_KEY_ACME")])
    assert "fk-the-clear-text-key" not in str(err.value)
    assert err.value.field == "governance.tenants[0].key_sha256_env"


def test_a_hash_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "fleet-key-acme"
    secret.write_text(f"{DIGEST}  -\n")  # as `sha256sum` writes it
    (resolved,) = resolve_keys([TenantKey(tenant="acme", key_sha256_file=str(secret))])
    assert resolved.key_sha256 == DIGEST and resolved.key_sha256_file is None


def test_a_missing_or_wrong_secret_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError, match="cannot read the SHA-256 of tenant 'acme'") as err:
        resolve_keys([TenantKey(tenant="acme", key_sha256_file=str(missing))])
    assert (err.value.file, err.value.field) == (str(missing), "governance.tenants[0].key_sha256_file")
    wrong = tmp_path / "wrong"
    wrong.write_text("fk-the-clear-text-key\n")
    with pytest.raises(ConfigError, match=f"file {wrong} does not hold a SHA-256") as err:
        resolve_keys([TenantKey(tenant="acme", key_sha256_file=str(wrong))])
    assert "fk-the-clear-text-key" not in str(err.value)


def test_a_key_is_identified_by_tenant_and_hash_prefix() -> None:
    tenants = [TenantKey(tenant="acme", key_sha256=hash_key(k)) for k in ("fk-1", "fk-2")]
    one, two = identify("Bearer fk-1", tenants), identify("Bearer fk-2", tenants)
    assert one[0] == two[0] and one[0].tenant == "acme"
    assert (one[1], two[1]) == (f"acme:{hash_key('fk-1')[:16]}", f"acme:{hash_key('fk-2')[:16]}")
    assert identify(None, []) == (ANONYMOUS, "anonymous")
    with pytest.raises(Unauthorized):
        identify("Bearer fk-3", tenants)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("fleet.example.com", False),
        ("", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_auth_off_is_said_in_so_many_words() -> None:
    assert GovernanceConfig.model_validate({"auth": "off"}).auth == "off"
    assert GovernanceConfig.model_validate({"auth": False}).auth == "off"  # YAML 1.1 reads `off` so
    assert GovernanceConfig().auth is None and not GovernanceConfig().keys_required
    with pytest.raises(ValidationError, match="auth: 'off' serves without keys, yet tenants lists some"):
        GovernanceConfig.model_validate(
            {"auth": "off", "tenants": [{"tenant": "acme", "key_sha256": DIGEST}]}
        )
    with pytest.raises(ValidationError, match="auth: 'keys' needs at least one key in tenants"):
        GovernanceConfig.model_validate({"auth": "keys"})
    with pytest.raises(ValidationError, match="auth"):
        GovernanceConfig.model_validate({"auth": "none"})
    keyed = GovernanceConfig.model_validate(
        {"auth": "keys", "tenants": [{"tenant": "acme", "key_sha256": DIGEST}]}
    )
    assert keyed.keys_required


def test_the_readme_governance_yaml_requires_keys_from_the_environment_and_a_file() -> None:
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Governance") : readme.index("## Memory")]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match is not None
    governance = GovernanceConfig.model_validate(yaml.safe_load(match.group(1))["governance"])
    assert governance.keys_required
    assert [(t.key_sha256_env, t.key_sha256_file) for t in governance.tenants] == [
        ("FLEET_KEY_ACME", None),
        (None, "/run/secrets/fleet-key-platform"),
    ]
