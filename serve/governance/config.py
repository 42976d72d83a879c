"""The ``governance`` section of a deploy config, and the policy engines it builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from serve.audit.config import AuditConfig
from serve.auth import TenantKey
from serve.errors import ConfigError
from serve.manifest import Strict
from serve.policy.engine import OpaEngine, PolicyEngine, RegoEngine, load_modules
from serve.policy.schema import POINTS, Point

__all__ = ["GovernanceConfig", "Shadow", "build_engines", "load_data"]


class EngineConfig(Strict):
    kind: Literal["rego", "opa"] = Field(default="rego", description="regopy in-process, or an OPA server.")
    url: str | None = Field(default=None, description="OPA server (kind opa), e.g. http://127.0.0.1:8181.")
    timeout_s: float = Field(default=0.5, gt=0, le=30, description="OPA request timeout (then deny).")

    @model_validator(mode="after")
    def _url(self) -> EngineConfig:
        if self.kind == "opa" and not self.url:
            raise ValueError("url: an OPA engine needs the server's url")
        return self


class GovernanceConfig(Strict):
    policies: list[str] = Field(
        default_factory=lambda: ["configs/policies"],
        description="Rego modules and policy data (*.rego, *.yaml): files or folders.",
    )
    shadow: list[str] = Field(
        default_factory=list,
        description="Rego modules evaluated and audited beside the enforced ones, never enforced.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Where policies are evaluated.")
    tenants: list[TenantKey] = Field(
        default_factory=list,
        description="API keys (hashed). None listed: auth is off, callers are 'anonymous' "
        "(refused beyond loopback unless auth is 'off').",
    )
    auth: Literal["keys", "off"] | None = Field(
        default=None,
        description="'keys': every endpoint but /v1/health needs a key from tenants (which must "
        "list one). 'off': no keys, every caller is 'anonymous', even when http_options.host is "
        "beyond loopback (the only way to serve so). Unset: keys if tenants lists any; without "
        "them the fleet serves on loopback only.",
    )
    audit: AuditConfig = Field(default_factory=AuditConfig, description="The audit log.")

    @field_validator("auth", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object) -> object:
        # YAML 1.1 (PyYAML, Ray's config loader) reads an unquoted `off` as false, `on` as true.
        return {False: "off", True: "keys"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _auth(self) -> GovernanceConfig:
        if self.auth == "off" and self.tenants:
            raise ValueError("auth: 'off' serves without keys, yet tenants lists some: drop one or the other")
        if self.auth == "keys" and not self.tenants:
            raise ValueError("auth: 'keys' needs at least one key in tenants (`fleet keys new` makes one)")
        return self

    @property
    def keys_required(self) -> bool:
        """Whether a caller needs an API key (every endpoint but /v1/health)."""
        return bool(self.tenants)


def _resolve(root: Path, items: list[str]) -> list[Path]:
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in items]
    for path in paths:
        if not path.exists():
            raise ConfigError("no such policy file or folder", file=str(path), field="governance.policies")
    return paths


def load_data(paths: list[Path]) -> dict[str, Any]:
    """Policy data (``*.yaml`` beside the modules), merged, as ``data.config``."""
    merged: dict[str, Any] = {}
    for path in paths:
        for file in (
            sorted(path.glob("*.yaml")) if path.is_dir() else [path] if path.suffix == ".yaml" else []
        ):
            try:
                merged.update(yaml.safe_load(file.read_text()) or {})
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"invalid policy data: {exc}", file=str(file)) from None
    return {"config": merged}


Shadow = tuple[PolicyEngine, frozenset[Point]]

# Rego compiled once per process for the same modules: validating a fleet compiles the
# fleet's (and each agent's beside them), as starting each replica would again.
_Key = tuple[tuple[str, ...], tuple[str, ...], str, tuple[str, ...], bool]
_compiled: dict[_Key, tuple[RegoEngine, Shadow | None]] = {}


def build_engines(
    config: GovernanceConfig,
    root: Path,
    extra: list[str] = (),  # type: ignore[assignment]
    *,
    memo: bool = True,
) -> tuple[PolicyEngine, Shadow | None]:
    """The enforced engine, and the shadow one with the points its modules change."""
    for item in extra:  # an agent adds rules, never data that would override the platform's
        if not item.endswith(".rego"):
            raise ConfigError("an agent's policies.files may only name .rego modules", file=item)
    key = (tuple(config.policies), tuple(config.shadow), str(root), tuple(extra), memo)
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = _compiled[key] = _compile(config, root, list(extra), memo)
    local, shadow = compiled
    if config.engine.kind == "opa":  # its client binds to the loop that first uses it: one per call
        assert config.engine.url is not None
        return OpaEngine(config.engine.url, config.engine.timeout_s), shadow
    return local, shadow


def _compile(
    config: GovernanceConfig, root: Path, extra: list[str], memo: bool
) -> tuple[RegoEngine, Shadow | None]:
    paths = _resolve(root, [*config.policies, *extra])
    modules = [m for m in load_modules(paths) if m.path.endswith(".rego")]
    data = load_data(paths)
    local = RegoEngine(modules, data, memo=memo)  # compiled even for OPA: a bad file fails the deploy
    if not config.shadow:
        return local, None
    shadow_modules = load_modules(_resolve(root, config.shadow))
    replaced = {m.package for m in shadow_modules}
    kept = [m for m in modules if m.package not in replaced]
    points = {p for p in POINTS if f"fleet.{p}" in replaced}
    if replaced - {f"fleet.{p}" for p in POINTS}:  # a shared module changed: every point may
        points = set(POINTS)
    return local, (RegoEngine([*kept, *shadow_modules], data, memo=memo), frozenset(points))
