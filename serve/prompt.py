"""System prompts rendered from an agent's template and its typed variables.

Schema-first: the manifest declares each variable's type; a request sets values in its
OpenAI ``metadata`` (strings, coerced to the declared type); a missing required value
or a value of the wrong type is a 400 naming ``metadata.<variable>``.
"""

from __future__ import annotations

from typing import Any

import jinja2
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from serve.errors import InvalidRequest
from serve.manifest import VARIABLE_TYPES, AgentSpec

__all__ = ["PromptRenderer"]


class PromptRenderer:
    def __init__(self, spec: AgentSpec) -> None:
        self._agent = spec.manifest.name
        variables = spec.manifest.prompt.variables
        fields: dict[str, Any] = {}
        for name, var in variables.items():
            kind = VARIABLE_TYPES[var.type]
            if var.default is not None:
                fields[name] = (kind, var.default)
            elif var.required:
                fields[name] = (kind, ...)
            else:
                fields[name] = (kind | None, None)
        self._schema: type[BaseModel] = create_model(
            f"{self._agent}_prompt", __config__=ConfigDict(extra="ignore"), **fields
        )
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        self._template = env.from_string(spec.prompt_source)
        self._static: str | None = None  # the prompt when a request sets no variable
        if not any(v.required for v in variables.values()):
            self._static = self.render(None)

    def render(self, metadata: dict[str, str] | None) -> str:
        """The system prompt for a request's metadata."""
        if not metadata and self._static is not None:
            return self._static
        try:
            values = self._schema.model_validate(metadata or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "metadata"
            raise InvalidRequest(
                f"prompt variable {name!r} of agent {self._agent!r}: {err['msg']}",
                param=f"metadata.{name}",
            ) from None
        return self._template.render(agent=self._agent, **values.model_dump())
