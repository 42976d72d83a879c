"""API keys and who a request is: hashed keys, ``Authorization: Bearer``, the anonymous principal.

A tenant's key is configured as its SHA-256, written in the config (``key_sha256``) or
read at deploy time from an environment variable (``key_sha256_env``) or a file such as
a mounted secret (``key_sha256_file``); :func:`resolve_keys` reads them, naming the
variable or file that is missing or wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from pathlib import Path

from pydantic import Field, model_validator

from serve.budget.config import BudgetLimits
from serve.context import ANONYMOUS_ID
from serve.errors import ConfigError, Unauthorized
from serve.manifest import Strict
from serve.policy.schema import Principal

__all__ = [
    "ANONYMOUS",
    "TenantKey",
    "authenticate",
    "hash_key",
    "identify",
    "is_loopback",
    "resolve_keys",
]

ANONYMOUS = Principal(tenant="anonymous", roles=["anonymous"], authenticated=False)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# How much of a key's hash names its principal (sessions are keyed by it): 64 bits tell
# a tenant's keys apart; the hash itself stays in the config.
PRINCIPAL_ID_HEX = 16


class TenantKey(Strict):
    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="Tenant the key belongs to.")
    key_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of the API key; never the key. Or key_sha256_env / key_sha256_file.",
    )
    key_sha256_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the key's SHA-256 (hex), read when the app is built "
        "(serve deploy), on the cluster.",
    )
    key_sha256_file: str | None = Field(
        default=None,
        min_length=1,
        description="File holding the key's SHA-256 (hex; its first word, as sha256sum writes it), "
        "e.g. a mounted secret under /run/secrets/, read when the app is built (serve deploy).",
    )
    roles: list[str] = Field(default_factory=list, description="Roles policies see for this key.")
    scopes: list[str] | None = Field(
        default=None, description="Most scopes an agent may use for this key (default: no limit)."
    )
    budget: BudgetLimits | None = Field(
        default=None, description="What this key may spend per UTC day and month (the ledger enforces it)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TenantKey:
        given = [f for f in ("key_sha256", "key_sha256_env", "key_sha256_file") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError(
                "key_sha256: give the key's hash in exactly one of key_sha256, key_sha256_env, "
                f"key_sha256_file (got {', '.join(given) or 'none'})"
            )
        return self

    def resolved(self, field: str) -> TenantKey:
        """This key with its hash read from its variable or file; errors name them and ``field``."""
        if self.key_sha256 is not None:
            return self
        if self.key_sha256_env is not None:
            name, where = self.key_sha256_env, f"{field}.key_sha256_env"
            text = os.environ.get(name)
            if text is None:
                raise ConfigError(
                    f"environment variable {name} is not set (the SHA-256 of tenant {self.tenant!r}'s key)",
                    field=where,
                )
            source = f"environment variable {name}"
        else:
            assert self.key_sha256_file is not None
            path, where = Path(self.key_sha256_file), f"{field}.key_sha256_file"
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"cannot read the SHA-256 of tenant {self.tenant!r}'s key: {type(exc).__name__}: "
                    f"{getattr(exc, 'strerror', None) or exc}",
                    file=str(path),
                    field=where,
                ) from None
            source = f"file {path}"
        digest = (text.split() or [""])[0].lower()
        if not _SHA256.match(digest):  # its value is never echoed: it may be the key itself
            raise ConfigError(
                f"{source} does not hold a SHA-256 in hex (64 digits; `fleet keys new` prints one)",
                field=where,
            )
        return self.model_copy(update={"key_sha256": digest, "key_sha256_env": None, "key_sha256_file": None})


def resolve_keys(tenants: list[TenantKey], field: str = "governance.tenants") -> list[TenantKey]:
    """Every key's hash, read from its variable or file (at deploy time)."""
    return [tenant.resolved(f"{field}[{i}]") for i, tenant in enumerate(tenants)]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (``127.0.0.0/8``, ``::1``, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def identify(authorization: str | None, tenants: list[TenantKey]) -> tuple[Principal, str]:
    """The principal of an ``Authorization: Bearer <key>`` header, and its id: the tenant
    and the first hex digits of its key's hash (``acme:1f2e...``), or ``anonymous``."""
    if not tenants:
        return ANONYMOUS, ANONYMOUS_ID
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    presented = hash_key(key.strip())
    found = None
    for tenant in tenants:  # every entry is compared: the time does not tell which matched
        assert tenant.key_sha256 is not None, "tenant keys are resolved when the app is built"
        if hmac.compare_digest(presented, tenant.key_sha256):
            found = tenant
    if found is None:
        raise Unauthorized("Incorrect API key provided")
    principal = Principal(
        tenant=found.tenant, roles=list(found.roles), authenticated=True, scopes=found.scopes
    )
    return principal, f"{found.tenant}:{presented[:PRINCIPAL_ID_HEX]}"


def key_budgets(tenants: list[TenantKey]) -> dict[str, BudgetLimits]:
    """Each key's own caps by its principal id (``<tenant>:<16 hex>``), as :func:`identify` names it."""
    return {
        f"{t.tenant}:{t.key_sha256[:PRINCIPAL_ID_HEX]}": t.budget
        for t in tenants
        if t.budget is not None and t.key_sha256 is not None
    }


def authenticate(authorization: str | None, tenants: list[TenantKey]) -> Principal:
    """The principal of an ``Authorization: Bearer <key>`` header (401 without a valid key)."""
    return identify(authorization, tenants)[0]
