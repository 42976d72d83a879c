"""The price of a model backend, and the cost of its calls, in ``Decimal`` USD."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MILLION", "Price", "prompt_bound"]

MILLION = Decimal(1_000_000)
# Tokens a chat template adds around each message (role markers, separators): SmolLM2,
# Qwen2.5 and Llama 3 add 4 to 6; 16 leaves room.
_TEMPLATE_TOKENS_PER_MESSAGE = 16


class Price(BaseModel):
    """What a model backend charges, per million tokens (the deploy config's `price`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_usd_per_million: Decimal = Field(ge=0, description="USD per million prompt tokens.")
    completion_usd_per_million: Decimal = Field(ge=0, description="USD per million completion tokens.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """The exact cost of a call that used these tokens."""
        spent = (
            prompt_tokens * self.prompt_usd_per_million + completion_tokens * self.completion_usd_per_million
        )
        return spent / MILLION

    def completion_tokens_within(self, amount: Decimal) -> int | None:
        """The most completion tokens ``amount`` pays for (None: completions are free)."""
        if self.completion_usd_per_million == 0:
            return None
        return max(int(amount * MILLION / self.completion_usd_per_million), 0)


def prompt_bound(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()) -> int:
    """An upper bound on the prompt tokens of a call, without its tokenizer: the UTF-8 bytes
    of the messages and tool schemas as JSON, plus the template's tokens per message.

    A byte-level BPE tokenizer (GPT-2's family: SmolLM2, Qwen, Llama 3) never makes more
    tokens of a text than it has bytes, and JSON is longer than the text a template renders
    (quotes, keys, escapes); a tool's schema is rendered into the prompt at most once."""
    body = json.dumps([list(messages), list(tools)], ensure_ascii=False, separators=(",", ":"), default=str)
    return len(body.encode()) + _TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 1)
