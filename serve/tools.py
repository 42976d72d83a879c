"""Tools: typed callables the agent loop runs on the model's behalf.

A tool is a plain function under :func:`tool` or a LangChain ``BaseTool``; both become a
:class:`Tool` with a pydantic args schema from which the OpenAI function schema is
derived. Arguments are validated before the tool runs; a failing or slow tool raises
:class:`~serve.errors.ToolError`, which the loop reports to the model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from serve.errors import ConfigError, InvalidToolArguments, ToolError

__all__ = ["Tool", "as_tool", "load_tools", "tool"]

TOOLS_FILE = "tools.py"


class Tool:
    """A named, described, schema-checked callable (sync or async)."""

    def __init__(
        self,
        name: str,
        description: str,
        args_schema: type[BaseModel],
        func: Callable[..., Any],
    ) -> None:
        self.name = name
        self.description = description
        self.args_schema = args_schema
        self._func = func

    def openai_schema(self) -> dict[str, Any]:
        """The ``tools[]`` entry the model is given."""
        params = self.args_schema.model_json_schema()
        params.pop("title", None)
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": params},
        }

    def validate(self, arguments: str | Mapping[str, Any]) -> BaseModel:
        """Check the model's arguments; raises :class:`InvalidToolArguments`."""
        try:
            if isinstance(arguments, str):
                return self.args_schema.model_validate_json(arguments or "{}")
            return self.args_schema.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidToolArguments(f"invalid arguments for {self.name}: {problems}") from None

    async def run(self, arguments: str | Mapping[str, Any], timeout_s: float) -> str:
        """Validate, run with a timeout, and return the result as text for the model."""
        args = self.validate(arguments)
        try:
            result = await asyncio.wait_for(self._call(args), timeout=timeout_s)
        except TimeoutError:
            raise ToolError(f"{self.name} timed out after {timeout_s:g}s") from None
        except (ToolError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a tool's own failure is data for the model
            raise ToolError(f"{self.name} failed: {type(exc).__name__}: {exc}") from exc
        return result if isinstance(result, str) else json.dumps(result, default=str)

    async def _call(self, args: BaseModel) -> Any:
        kwargs = {name: getattr(args, name) for name in type(args).model_fields}
        kwargs.update(args.model_extra or {})  # a LangChain tool with a dict schema
        if inspect.iscoroutinefunction(self._func):
            return await self._func(**kwargs)
        return await asyncio.to_thread(self._func, **kwargs)


def _schema_from_signature(func: Callable[..., Any], name: str) -> type[BaseModel]:
    hints = get_type_hints(func, include_extras=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigError(f"tool {name}: *args/**kwargs cannot be described to a model")
        if param.name not in hints:
            raise ConfigError(f"tool {name}: parameter {param.name!r} needs a type annotation")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], default)
    model: type[BaseModel] = create_model(f"{name}_args", __config__=ConfigDict(extra="forbid"), **fields)
    return model


def tool(
    func: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None
) -> Any:
    """Make a typed function a :class:`Tool`: ``@tool`` or ``@tool(name=..., description=...)``.

    The description defaults to the docstring; parameters are described with
    ``Annotated[T, Field(description=...)]``.
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        tool_name = name or f.__name__
        doc = description or inspect.getdoc(f)
        if not doc:
            raise ConfigError(f"tool {tool_name}: give it a docstring or a description")
        return Tool(tool_name, doc, _schema_from_signature(f, tool_name), f)

    return wrap(func) if func is not None else wrap


def _from_langchain(lc_tool: Any) -> Tool:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    spec = convert_to_openai_tool(lc_tool)["function"]
    schema = lc_tool.args_schema
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        # A dict schema: keep LangChain's own validation, expose the derived JSON schema.
        schema = _passthrough_schema(spec["name"], spec.get("parameters", {}))

    async def call(**kwargs: Any) -> Any:
        return await lc_tool.ainvoke(kwargs)

    return Tool(spec["name"], spec.get("description", ""), schema, call)


def _passthrough_schema(name: str, params: dict[str, Any]) -> type[BaseModel]:
    class Args(BaseModel):
        model_config = ConfigDict(extra="allow", json_schema_extra=lambda s: s.update(params))

    Args.__name__ = f"{name}_args"
    return Args


def as_tool(obj: Any) -> Tool | None:
    """A :class:`Tool` for a Fleet tool or a LangChain ``BaseTool``; ``None`` otherwise."""
    if isinstance(obj, Tool):
        return obj
    try:
        from langchain_core.tools import BaseTool
    except ImportError:  # LangChain is optional
        return None
    return _from_langchain(obj) if isinstance(obj, BaseTool) else None


# Each folder's tool module, imported once per process (validating the fleet, building
# its cards and starting a replica all ask for it): every tool it defines, by name.
_loaded: dict[Path, dict[str, Tool]] = {}


def load_tools(folder: Path, names: list[str]) -> dict[str, Tool]:
    """The tools the manifest names, from ``folder/tools.py`` (imported by path, once)."""
    if not names:
        return {}
    key = folder.resolve()
    found = _loaded.get(key)
    if found is None:
        found = _loaded[key] = _import_tools(folder)
    path, manifest = folder / TOOLS_FILE, str(folder / "agent.yaml")
    missing = [(i, n) for i, n in enumerate(names) if n not in found]
    if missing:
        i, n = missing[0]
        raise ConfigError(
            f"tool {n!r} is not defined in {str(path)!r}", file=manifest, field=f"tools[{i}].name"
        )
    return {n: found[n] for n in names}


def _import_tools(folder: Path) -> dict[str, Tool]:
    path = folder / TOOLS_FILE
    if not path.is_file():
        raise ConfigError(
            f"the manifest names tools but {str(path)!r} does not exist", file=str(folder / "agent.yaml")
        )
    module_name = f"fleet_agent_tools_{folder.name.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"importing failed: {type(exc).__name__}: {exc}", file=str(path)) from exc
    found: dict[str, Tool] = {}
    for value in vars(module).values():
        t = as_tool(value)
        if t is not None:
            found[t.name] = t
    return found


class DelegateArgs(BaseModel):
    """What the model passes when it delegates."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, description="The question or task for the other agent, self-contained.")
