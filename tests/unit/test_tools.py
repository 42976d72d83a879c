"""serve.tools: the @tool decorator, LangChain tools, running with validation and timeouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pytest
from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.tools import tool as lc_tool
from pydantic import BaseModel, Field

from serve.errors import ConfigError, InvalidToolArguments, ToolError
from serve.testing import boom, slow
from serve.tools import Tool, as_tool, load_tools, tool
from tests.unit.conftest import run


@tool
def lookup(
    employee_id: Annotated[str, Field(pattern=r"^E\d{4}$", description="Employee id, e.g. E1001.")],
    limit: Annotated[int, Field(ge=1, le=5, description="How many rows.")] = 2,
    verbose: bool = False,
) -> dict[str, object]:
    """Look up an employee.

    Returns the matching rows.
    """
    return {"employee_id": employee_id, "limit": limit, "verbose": verbose}


@tool(name="sum_numbers", description="Add two numbers.")
async def add(a: int, b: float) -> float:
    return a + b


@tool
def nothing() -> None:
    """Returns None."""
    return None


@tool
def text() -> str:
    """Returns text as is."""
    return 'plain "text"'


# --- schema --------------------------------------------------------------------------


def test_sync_tool_schema() -> None:
    assert isinstance(lookup, Tool)
    assert lookup.openai_schema() == {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up an employee.\n\nReturns the matching rows.",
            "parameters": {
                "type": "object",
                "properties": {
                    "employee_id": {
                        "type": "string",
                        "title": "Employee Id",
                        "description": "Employee id, e.g. E1001.",
                        "pattern": r"^E\d{4}$",
                    },
                    "limit": {
                        "type": "integer",
                        "title": "Limit",
                        "description": "How many rows.",
                        "minimum": 1,
                        "maximum": 5,
                        "default": 2,
                    },
                    "verbose": {"type": "boolean", "title": "Verbose", "default": False},
                },
                "required": ["employee_id"],
                "additionalProperties": False,
            },
        },
    }


def test_async_tool_schema_with_explicit_name_and_description() -> None:
    schema = add.openai_schema()["function"]
    assert schema["name"] == "sum_numbers"
    assert schema["description"] == "Add two numbers."
    assert schema["parameters"]["properties"] == {
        "a": {"type": "integer", "title": "A"},
        "b": {"type": "number", "title": "B"},
    }
    assert schema["parameters"]["required"] == ["a", "b"]
    assert "title" not in schema["parameters"]


def test_tool_without_docstring_is_a_config_error() -> None:
    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="tool undocumented: give it a docstring or a description"):
        tool(undocumented)


def test_tool_parameters_need_annotations() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        """Untyped."""
        return x

    with pytest.raises(ConfigError, match="tool untyped: parameter 'x' needs a type annotation"):
        tool(untyped)


def test_tool_rejects_var_args() -> None:
    def star(*args: int) -> int:
        """Star args."""
        return sum(args)

    with pytest.raises(ConfigError, match=r"tool star: \*args/\*\*kwargs cannot be described to a model"):
        tool(star)


# --- running -------------------------------------------------------------------------


def test_sync_tool_runs_with_defaults_and_json_result() -> None:
    result = run(lookup.run('{"employee_id": "E1001"}', 5))
    assert json.loads(result) == {"employee_id": "E1001", "limit": 2, "verbose": False}


def test_tool_accepts_a_mapping() -> None:
    result = run(lookup.run({"employee_id": "E1002", "limit": 3}, 5))
    assert json.loads(result) == {"employee_id": "E1002", "limit": 3, "verbose": False}


def test_async_tool_runs() -> None:
    assert run(add.run('{"a": 2, "b": 0.5}', 5)) == "2.5"


def test_string_result_is_returned_verbatim() -> None:
    assert run(text.run("", 5)) == 'plain "text"'


def test_none_result_is_json_null() -> None:
    assert run(nothing.run("{}", 5)) == "null"


def test_extra_arguments_are_rejected() -> None:
    with pytest.raises(InvalidToolArguments) as info:
        run(lookup.run('{"employee_id": "E1001", "colour": "red"}', 5))
    assert str(info.value) == "invalid arguments for lookup: colour: Extra inputs are not permitted"


def test_invalid_arguments_name_the_field() -> None:
    with pytest.raises(InvalidToolArguments) as info:
        run(lookup.run('{"employee_id": "1001", "limit": 9}', 5))
    message = str(info.value)
    assert message.startswith("invalid arguments for lookup: employee_id: String should match pattern")
    assert "; limit: Input should be less than or equal to 5" in message


def test_missing_argument() -> None:
    with pytest.raises(
        InvalidToolArguments, match="invalid arguments for lookup: employee_id: Field required"
    ):
        run(lookup.run("{}", 5))


def test_arguments_that_are_not_json() -> None:
    with pytest.raises(
        InvalidToolArguments, match=r"invalid arguments for sum_numbers: arguments: Invalid JSON"
    ):
        run(add.run('{"a": 1,', 5))


def test_invalid_arguments_is_a_tool_error() -> None:
    assert issubclass(InvalidToolArguments, ToolError)


def test_raising_tool_becomes_tool_error() -> None:
    with pytest.raises(ToolError) as info:
        run(boom.run("{}", 5))
    assert not isinstance(info.value, InvalidToolArguments)
    assert str(info.value) == "boom failed: RuntimeError: disk on fire"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_slow_tool_times_out() -> None:
    with pytest.raises(ToolError) as info:
        run(slow.run("{}", 0.05))
    assert str(info.value) == "slow timed out after 0.05s"


# --- LangChain tools -----------------------------------------------------------------


@lc_tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class WeatherArgs(BaseModel):
    city: str = Field(description="City name.")
    unit: str = Field(default="C", description="C or F.")


class WeatherTool(BaseTool):
    name: str = "weather"
    description: str = "Current weather for a city."
    args_schema: type[BaseModel] = WeatherArgs

    def _run(self, city: str, unit: str = "C") -> str:
        return f"sunny in {city}, 21{unit}"


def test_langchain_decorated_tool() -> None:
    converted = as_tool(multiply)
    assert isinstance(converted, Tool)
    schema = converted.openai_schema()["function"]
    assert schema["name"] == "multiply"
    assert schema["description"] == "Multiply two integers."
    assert schema["parameters"]["properties"] == {
        "a": {"title": "A", "type": "integer"},
        "b": {"title": "B", "type": "integer"},
    }
    assert schema["parameters"]["required"] == ["a", "b"]
    assert run(converted.run('{"a": 6, "b": 7}', 5)) == "42"


def test_langchain_tool_arguments_are_validated() -> None:
    converted = as_tool(multiply)
    assert converted is not None
    with pytest.raises(InvalidToolArguments, match="invalid arguments for multiply: a: "):
        run(converted.run('{"a": "x", "b": 1}', 5))


def test_langchain_base_tool_subclass() -> None:
    converted = as_tool(WeatherTool())
    assert isinstance(converted, Tool)
    schema = converted.openai_schema()["function"]
    assert schema["name"] == "weather"
    assert schema["description"] == "Current weather for a city."
    assert schema["parameters"]["properties"]["city"] == {
        "description": "City name.",
        "title": "City",
        "type": "string",
    }
    assert schema["parameters"]["required"] == ["city"]
    assert run(converted.run('{"city": "Paris"}', 5)) == "sunny in Paris, 21C"
    assert run(converted.run({"city": "Oslo", "unit": "F"}, 5)) == "sunny in Oslo, 21F"


def test_langchain_tool_with_dict_schema_gets_its_arguments() -> None:
    weather = StructuredTool.from_function(
        func=lambda city: f"sunny in {city}",
        name="weather_dict",
        description="Weather for a city.",
        args_schema={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    converted = as_tool(weather)
    assert converted is not None
    assert converted.openai_schema()["function"]["parameters"]["properties"] == {"city": {"type": "string"}}
    assert run(converted.run('{"city": "Paris"}', 5)) == "sunny in Paris"


def test_as_tool_on_other_objects() -> None:
    assert as_tool(lookup) is lookup
    assert as_tool(len) is None
    assert as_tool("lookup") is None
    assert as_tool(WeatherTool) is None  # the class, not an instance


# --- load_tools ----------------------------------------------------------------------

TOOLS_PY = '''
from serve.tools import tool
from langchain_core.tools import tool as lc_tool

HELPER_CONSTANT = 3


@tool
def echo(text: str) -> str:
    """Return the text."""
    return text


@tool(name="renamed")
def python_name(x: int) -> int:
    """Registered under its tool name."""
    return x


@lc_tool
def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()
'''


def _folder(tmp_path: Path, name: str, source: str | None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if source is not None:
        (folder / "tools.py").write_text(source, encoding="utf-8")
    return folder


def test_load_tools_returns_the_named_tools_in_order(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "unit-tools-ok", TOOLS_PY)
    tools = load_tools(folder, ["shout", "renamed", "echo"])
    assert list(tools) == ["shout", "renamed", "echo"]
    assert all(isinstance(t, Tool) for t in tools.values())
    assert run(tools["shout"].run('{"text": "hi"}', 5)) == "HI"
    assert run(tools["renamed"].run('{"x": 4}', 5)) == "4"


def test_load_tools_without_names_needs_no_module(tmp_path: Path) -> None:
    assert load_tools(tmp_path / "does-not-exist", []) == {}


def test_load_tools_missing_module(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "unit-tools-none", None)
    with pytest.raises(ConfigError) as info:
        load_tools(folder, ["echo"])
    assert info.value.file == str(folder / "agent.yaml")
    assert str(info.value) == (
        f"{folder / 'agent.yaml'}: the manifest names tools but {str(folder / 'tools.py')!r} does not exist"
    )


def test_load_tools_undefined_tool(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "unit-tools-missing", TOOLS_PY)
    with pytest.raises(ConfigError) as info:
        load_tools(folder, ["echo", "python_name"])  # the function's name is not the tool's name
    assert info.value.file == str(folder / "agent.yaml")
    assert info.value.field == "tools[1].name"
    assert str(info.value) == (
        f"{folder / 'agent.yaml'}: tools[1].name: tool 'python_name' is not defined in "
        f"{str(folder / 'tools.py')!r}"
    )


def test_load_tools_first_missing_is_reported(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "unit-tools-missing-first", TOOLS_PY)
    with pytest.raises(ConfigError) as info:
        load_tools(folder, ["nope", "echo"])
    assert info.value.field == "tools[0].name"


def test_load_tools_module_that_raises(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "unit-tools-raises", "raise ValueError('no database')\n")
    with pytest.raises(ConfigError) as info:
        load_tools(folder, ["echo"])
    assert info.value.file == str(folder / "tools.py")
    assert str(info.value) == f"{folder / 'tools.py'}: importing failed: ValueError: no database"


def test_load_tools_module_with_syntax_error(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "unit-tools-syntax", "def broken(:\n")
    with pytest.raises(ConfigError, match="importing failed: SyntaxError"):
        load_tools(folder, ["echo"])


def test_load_tools_bad_tool_definition_is_an_import_error(tmp_path: Path) -> None:
    source = "from serve.tools import tool\n\n@tool\ndef nodoc(x: int) -> int:\n    return x\n"
    folder = _folder(tmp_path, "unit-tools-nodoc", source)
    with pytest.raises(ConfigError, match="importing failed: ConfigError: tool nodoc: give it a docstring"):
        load_tools(folder, ["nodoc"])


COUNTING = (
    TOOLS_PY
    + """
from pathlib import Path

with Path(__file__).with_name("imports.log").open("a") as log:
    log.write("imported\\n")
"""
)


def test_a_tool_module_is_imported_once_per_process_whatever_names_are_asked(tmp_path: Path) -> None:
    """Validating the fleet, building its cards and starting a replica all load the tools."""
    folder = _folder(tmp_path, "unit-tools-once", COUNTING)
    first = load_tools(folder, ["echo"])
    assert list(load_tools(folder, ["shout", "echo"])) == ["shout", "echo"]
    assert load_tools(folder / ".." / folder.name, ["echo"])["echo"] is first["echo"]
    with pytest.raises(ConfigError) as info:
        load_tools(folder, ["echo", "nope"])  # the same module; still checked against the names
    assert info.value.field == "tools[1].name"
    assert (folder / "imports.log").read_text().splitlines() == ["imported"]


def test_a_module_that_failed_to_import_is_imported_again(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "unit-tools-fixed", "raise ValueError('no database')\n")
    with pytest.raises(ConfigError, match="importing failed"):
        load_tools(folder, ["echo"])
    (folder / "tools.py").write_text(TOOLS_PY, encoding="utf-8")
    assert list(load_tools(folder, ["echo"])) == ["echo"]
