"""Helpers for the unit tests: no Ray, no network, no model.

Agent folders are written into ``tmp_path`` from a small valid manifest that each test
changes in the one place it is about. The test doubles (scripted model, tools, governed
harness, canaries, waits) are public, in :mod:`serve.testing`.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
AGENTS = ROOT / "agents"
EXAMPLE_AGENTS = ["orchestrator", "hr-policy-advisor", "supply-chain-optimizer", "fleet-monitor"]
# The example fleet on the scripted model: its args are fully deterministic.
LOCAL_CONFIG = ROOT / "configs" / "scripted.yaml"
TEST_APP_CONFIG = ROOT / "tests" / "integration" / "fleet-test.yaml"

T = TypeVar("T")

BASE_MANIFEST: dict[str, Any] = {
    "apiVersion": "fleet/v1",
    "version": "1.0.0",
    "role": "domain",
    "description": "An agent written by a unit test.",
    "owner": {"team": "Fleet QA", "contact": "qa@example.com"},
    "prompt": {
        "template": "prompt.md",
        "variables": {"customer": {"type": "string", "default": "Initech"}},
    },
    "sla": {"p95_latency_ms": 1000, "availability": 0.99},
}
BASE_PROMPT = "You serve {{ customer }}."

DROP = object()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion (pytest-asyncio is not installed)."""
    return asyncio.run(coro)


def manifest(name: str, **changes: Any) -> dict[str, Any]:
    """The base manifest named ``name`` with top-level keys replaced (``DROP`` removes one)."""
    data = copy.deepcopy(BASE_MANIFEST)
    data["name"] = name
    for key, value in changes.items():
        if value is DROP:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def write_agent(
    root: Path,
    name: str,
    *,
    manifest_data: dict[str, Any] | None = None,
    yaml_text: str | None = None,
    prompt_text: str | None = BASE_PROMPT,
    tools_py: str | None = None,
    folder: str | None = None,
    **changes: Any,
) -> Path:
    """Write ``root/<folder or name>/`` with agent.yaml, prompt.md and optionally tools.py.

    ``manifest_data`` replaces the whole manifest, ``yaml_text`` is written verbatim, otherwise
    the base manifest with ``changes`` is written.
    """
    path = root / (folder or name)
    path.mkdir(parents=True, exist_ok=True)
    if yaml_text is not None:
        (path / "agent.yaml").write_text(yaml_text, encoding="utf-8")
    else:
        body = manifest_data if manifest_data is not None else manifest(name, **changes)
        (path / "agent.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    if prompt_text is not None:
        (path / "prompt.md").write_text(prompt_text, encoding="utf-8")
    if tools_py is not None:
        (path / "tools.py").write_text(tools_py, encoding="utf-8")
    return path
