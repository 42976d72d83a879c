"""README snippets that need no cluster: the manifest example is a valid manifest."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from serve.manifest import AgentManifest

ROOT = Path(__file__).resolve().parents[2]


def test_readme_manifest_example_validates() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Add an agent") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match is not None
    manifest = AgentManifest.model_validate(yaml.safe_load(match.group(1)))
    assert manifest.name == "hr-policy-advisor" and manifest.tools[0].scope in manifest.scopes
