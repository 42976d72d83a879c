"""serve.budget.price: a backend's price, the exact cost of a call, how many completion tokens
an amount pays for, and the bound on a prompt's tokens the loop holds before a call."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import jinja2
import pytest
from pydantic import ValidationError

from serve.budget import Price, prompt_bound
from serve.models.base import BackendSettings
from serve.models.embedded import MODEL_DIR_NAME, model_cache_root
from serve.models.vllm.prompting import flatten_messages, tool_instructions
from serve.testing import echo

MINI = Price(prompt_usd_per_million=Decimal("0.15"), completion_usd_per_million=Decimal("0.60"))


def test_a_calls_cost_is_exact_decimal_arithmetic() -> None:
    cost = MINI.cost(1234, 56)  # 1234 * 0.15 + 56 * 0.60 = 185.1 + 33.6 = 218.7 per million
    assert cost == Decimal("0.0002187") and f"{cost:f}" == "0.0002187"
    assert (1234 * 0.15 + 56 * 0.60) / 1e6 != 0.0002187  # what floats would have said
    assert MINI.cost(1, 0) == Decimal("0.00000015") and MINI.cost(0, 1) == Decimal("0.0000006")
    assert MINI.cost(0, 0) == 0
    # ten thousand calls of one token each cost what one call of ten thousand tokens does
    assert sum((MINI.cost(1, 1) for _ in range(10_000)), Decimal(0)) == MINI.cost(10_000, 10_000)


def test_a_price_is_read_from_the_deploy_config_as_decimal_and_strictly() -> None:
    settings = BackendSettings.model_validate(
        {"price": {"prompt_usd_per_million": "0.15", "completion_usd_per_million": 0.6}}
    )
    assert settings.price == MINI  # a YAML float is read as the decimal it was written as
    assert BackendSettings().price is None
    with pytest.raises(ValidationError, match="completion_usd_per_million"):
        Price.model_validate({"prompt_usd_per_million": "0.15", "completion_usd_per_million": "-1"})
    with pytest.raises(ValidationError, match="cached_usd_per_million"):
        Price.model_validate(
            {"prompt_usd_per_million": "1", "completion_usd_per_million": "1", "cached_usd_per_million": "0"}
        )


def test_completion_tokens_within_an_amount_round_down() -> None:
    assert MINI.completion_tokens_within(Decimal("0.0000012")) == 2  # exactly two tokens' worth
    assert MINI.completion_tokens_within(Decimal("0.0000011999")) == 1  # not quite two
    assert MINI.completion_tokens_within(Decimal("0.0000005")) == 0  # not one
    assert MINI.completion_tokens_within(Decimal("-0.01")) == 0  # overspent: none, not a negative count
    assert MINI.completion_tokens_within(Decimal("0.0003")) == 500
    for amount in (Decimal("0.0000012"), Decimal("0.0000011999"), Decimal("0.0003"), Decimal("0.01")):
        fits = MINI.completion_tokens_within(amount)
        assert fits is not None
        assert MINI.cost(0, fits) <= amount < MINI.cost(0, fits + 1)  # the most it pays for


def test_completions_that_are_free_have_no_token_limit() -> None:
    free = Price(prompt_usd_per_million=Decimal("0.15"), completion_usd_per_million=Decimal(0))
    assert free.completion_tokens_within(Decimal("0.0000001")) is None
    assert free.completion_tokens_within(Decimal(0)) is None


# --- the prompt's bound, against a real byte-level BPE tokenizer ------------------------


def _smollm2() -> Path:
    return model_cache_root() / MODEL_DIR_NAME


def _tool(name: str, description: str, **properties: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


_NOISE = "".join(chr(random.Random(7).randint(0x21, 0x2FFF)) for _ in range(300))  # tokens near bytes
_BOOKING = _tool(
    "book_room",
    "Réserve une salle — 会議室を予約します.",
    city={"type": "string", "enum": ["Zürich", "São Paulo", "東京"]},
    seats={"type": "integer", "minimum": 1},
)
_CONVERSATIONS: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = [
    (
        "plain English",
        [
            {"role": "system", "content": "You serve Initech."},
            {"role": "user", "content": "How many days of leave do I have left this year?"},
        ],
        [],
    ),
    (
        "non-ASCII",
        [{"role": "user", "content": "Zoë's naïve café — 東京で会いましょう 🙂🚀 Ωμέγα مرحبا"}],
        [],
    ),
    ("noise", [{"role": "user", "content": _NOISE}], []),
    (
        "tool schemas",
        [{"role": "system", "content": "Ты помощник."}, {"role": "user", "content": "Book Zürich for 4"}],
        [echo.openai_schema(), _BOOKING],
    ),
    (
        "a tool schema that says nothing",
        [{"role": "user", "content": "x"}],
        [{"type": "function", "function": {"name": "x", "parameters": {}}}],
    ),
    (
        "a tool's call and result",
        [
            {"role": "system", "content": "You book rooms."},
            {"role": "user", "content": "Book 東京 for 2 🙂"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "book_room", "arguments": '{"city": "東京", "seats": 2}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "réservé: salle « Fuji » ✓"},
        ],
        [_BOOKING],
    ),
]


@pytest.mark.parametrize(
    ("messages", "tools"), [(m, t) for _, m, t in _CONVERSATIONS], ids=[name for name, _, _ in _CONVERSATIONS]
)
def test_the_prompt_bound_is_at_least_the_tokens_the_embedded_model_is_shown(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> None:
    folder = _smollm2()
    if not (folder / "tokenizer.json").is_file() or not (folder / "chat_template.jinja").is_file():
        pytest.skip(
            f"no SmolLM2 tokenizer at {folder} (convert the embedded model: python -m serve.models.embedded)"
        )
    tokenizers = pytest.importorskip("tokenizers", reason="no `tokenizers` package to count tokens with")
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template)  # as HF's
    for choice in ("auto", "required"):
        # The prompt as the vLLM backend renders it for a template that ignores tools:
        # the tools described in the system message, the conversation flattened.
        shown = flatten_messages(messages, tool_instructions(tools, choice) if tools else "")
        text = template.render(messages=shown, add_generation_prompt=True)
        tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
        assert tokens <= prompt_bound(messages, tools), (choice, tokens, text)
        # a byte-level BPE never makes more tokens of a text than its UTF-8 bytes
        assert tokens <= len(text.encode())


def test_the_prompt_bound_is_at_least_the_utf8_bytes_of_every_text_it_holds() -> None:
    # What makes it a bound for any byte-level BPE, with no tokenizer at hand.
    for _, messages, tools in _CONVERSATIONS:
        texts = [m["content"] or "" for m in messages] + [
            json.dumps(t, ensure_ascii=False, separators=(",", ":")) for t in tools
        ]
        assert prompt_bound(messages, tools) >= sum(len(t.encode()) for t in texts) + 16 * len(messages)
