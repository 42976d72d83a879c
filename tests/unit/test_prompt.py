"""serve.prompt.PromptRenderer: typed template variables set per request in ``metadata``."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.errors import ConfigError, InvalidRequest
from serve.manifest import load_agent
from serve.prompt import PromptRenderer
from tests.unit.conftest import AGENTS, write_agent

VARIABLES = {
    "company": {"type": "string", "default": "Acme Corp"},
    "priority": {"type": "integer", "default": 1},
    "level": {"type": "number", "default": 0.95},
    "vip": {"type": "boolean", "default": False},
    "region": {"type": "string"},
}
TEMPLATE = (
    "{{ agent }} for {{ company }}: priority {{ priority }}, level {{ level }}, vip {{ vip }}"
    "{% if region %}, region {{ region }}{% endif %}."
)


@pytest.fixture
def renderer(tmp_path: Path) -> PromptRenderer:
    folder = write_agent(
        tmp_path, "typed", prompt={"template": "prompt.md", "variables": VARIABLES}, prompt_text=TEMPLATE
    )
    return PromptRenderer(load_agent(folder))


def test_defaults(renderer: PromptRenderer) -> None:
    expected = "typed for Acme Corp: priority 1, level 0.95, vip False."
    assert renderer.render(None) == expected
    assert renderer.render({}) == expected


def test_metadata_values_are_coerced_to_their_types(renderer: PromptRenderer) -> None:
    out = renderer.render(
        {"company": "Globex", "priority": "3", "level": "0.5", "vip": "true", "region": "EU"}
    )
    assert out == "typed for Globex: priority 3, level 0.5, vip True, region EU."


def test_unknown_metadata_keys_are_ignored(renderer: PromptRenderer) -> None:
    assert renderer.render({"trace": "abc"}) == "typed for Acme Corp: priority 1, level 0.95, vip False."


@pytest.mark.parametrize(
    ("metadata", "param", "message"),
    [
        (
            {"priority": "high"},
            "metadata.priority",
            "prompt variable 'priority' of agent 'typed': Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        (
            {"vip": "perhaps"},
            "metadata.vip",
            "prompt variable 'vip' of agent 'typed': Input should be a valid boolean, unable to interpret input",
        ),
        (
            {"level": "lots"},
            "metadata.level",
            "prompt variable 'level' of agent 'typed': Input should be a valid number, "
            "unable to parse string as a number",
        ),
    ],
)
def test_wrong_type_is_a_400_naming_the_variable(
    renderer: PromptRenderer, metadata: dict[str, str], param: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        renderer.render(metadata)
    assert info.value.param == param
    assert info.value.message == message
    assert info.value.status == 400


def test_required_variable(tmp_path: Path) -> None:
    folder = write_agent(
        tmp_path,
        "needs-ticket",
        prompt={"template": "prompt.md", "variables": {"ticket": {"type": "string", "required": True}}},
        prompt_text="Ticket {{ ticket }}",
    )
    renderer = PromptRenderer(load_agent(folder))
    with pytest.raises(InvalidRequest) as info:
        renderer.render(None)
    assert info.value.param == "metadata.ticket"
    assert info.value.message == "prompt variable 'ticket' of agent 'needs-ticket': Field required"
    assert renderer.render({"ticket": "T-1"}) == "Ticket T-1"


def test_required_is_ignored_when_a_default_exists(tmp_path: Path) -> None:
    variables = {"ticket": {"type": "string", "required": True, "default": "none"}}
    folder = write_agent(
        tmp_path,
        "defaulted",
        prompt={"template": "prompt.md", "variables": variables},
        prompt_text="{{ ticket }}",
    )
    assert PromptRenderer(load_agent(folder)).render(None) == "none"


@pytest.mark.parametrize(
    ("name", "metadata", "expected"),
    [
        ("hr-policy-advisor", None, "You are the HR policy advisor of Acme Corp."),
        ("hr-policy-advisor", {"company": "Globex", "country": "FR"}, "using only the FR handbook"),
        ("supply-chain-optimizer", None, "cycle service level of 0.95."),
        ("supply-chain-optimizer", {"service_level": "0.99"}, "cycle service level of 0.99."),
        ("fleet-monitor", None, "You are fleet-monitor, the fleet's infrastructure monitor."),
    ],
)
def test_example_prompts(name: str, metadata: dict[str, str] | None, expected: str) -> None:
    assert expected in PromptRenderer(load_agent(AGENTS / name)).render(metadata)


def test_variable_named_agent_is_caught_by_validation(tmp_path: Path) -> None:
    folder = write_agent(
        tmp_path,
        "shadow",
        prompt={"template": "prompt.md", "variables": {"agent": {"type": "string", "default": "x"}}},
        prompt_text="I am {{ agent }}",
    )
    with pytest.raises(ConfigError, match=r"prompt\.variables"):
        PromptRenderer(load_agent(folder))
