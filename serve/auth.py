"""API keys and who a request is: hashed keys, ``Authorization: Bearer``, the anonymous principal."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import Field

from serve.errors import Unauthorized
from serve.manifest import Strict
from serve.policy.schema import Principal

__all__ = ["ANONYMOUS", "TenantKey", "authenticate", "hash_key"]

ANONYMOUS = Principal(tenant="anonymous", roles=["anonymous"], authenticated=False)


class TenantKey(Strict):
    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="Tenant the key belongs to.")
    key_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of the API key; never the key."
    )
    roles: list[str] = Field(default_factory=list, description="Roles policies see for this key.")
    scopes: list[str] | None = Field(
        default=None, description="Most scopes an agent may use for this key (default: no limit)."
    )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authenticate(authorization: str | None, tenants: list[TenantKey]) -> Principal:
    """The principal of an ``Authorization: Bearer <key>`` header."""
    if not tenants:
        return ANONYMOUS
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    presented = hash_key(key.strip())
    found = None
    for tenant in tenants:  # every entry is compared: the time does not tell which matched
        if hmac.compare_digest(presented, tenant.key_sha256):
            found = tenant
    if found is None:
        raise Unauthorized("Incorrect API key provided")
    return Principal(tenant=found.tenant, roles=list(found.roles), authenticated=True, scopes=found.scopes)
