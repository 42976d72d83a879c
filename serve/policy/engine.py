"""Policy engines: Rego in-process (regopy, the default) or an OPA server over HTTP.

Each decision point ``p`` is the Rego rule ``data.fleet.<p>.decision``, which must be a
:class:`~serve.policy.schema.PolicyResult`. An engine returns that result or raises
:class:`PolicyFailure`; the caller turns a failure into a denial (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import ray._raylet  # noqa: F401  # before regopy: see the note below
from pydantic import ValidationError

# Ray's extension must be loaded before regopy's: loaded first, regopy's library takes
# over symbols that Ray's bundled gRPC also defines, and the next Ray GCS client a process
# makes aborts ("free(): invalid pointer" in grpc_core::ChannelInit). A process that
# imports the policy engine and then calls ray.init (a test driver, a bench) crashed.
from regopy import Input, Interpreter, LogLevel, RegoError
from regopy.rego_shared import rego as _C

from serve.canonical import canonical
from serve.errors import ConfigError, PolicyFailure
from serve.policy.schema import INPUT_VERSION, POINTS, Point, PolicyResult

__all__ = [
    "EncodedInput",
    "OpaEngine",
    "PolicyEngine",
    "PolicyModule",
    "RegoEngine",
    "encode_input",
    "load_modules",
]

_PACKAGE = re.compile(r"^\s*package\s+([\w.]+)", re.MULTILINE)
_ERROR_AT = re.compile(r"\(error \d+:([^|\s]+)\|(\d+)\|")
_ERROR_MSG = re.compile(r"\(errormsg \d+:([^)]*)\)")


@dataclass(frozen=True)
class PolicyModule:
    path: str
    source: str

    @property
    def package(self) -> str:
        match = _PACKAGE.search(self.source)
        return match.group(1) if match else ""

    @property
    def version(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class EncodedInput:
    """A policy input's canonical JSON (:func:`serve.canonical.canonical`), whole and without
    the request id: the digest in its audit record and the key of an engine's memo."""

    whole: bytes
    without_request_id: bytes


def encode_input(
    point: Point, request_id: str, chain: list[str], principal: bytes, agent: bytes, action: dict[str, Any]
) -> EncodedInput:
    """``canonical(document)`` of a ``fleet.policy/v1`` input, put together from its parts.

    ``principal`` and ``agent`` are their canonical JSON, which a replica encodes once: a
    decision then encodes only its action, chain and id, where encoding the whole document
    twice (digest, memo key) was a third of its cost. Canonical JSON sorts keys, so the
    parts go in the order ``action, agent, point, principal, request{chain, id}, version``;
    a test holds this to ``canonical`` of the document. ``action`` is JSON already (as the
    document's model dumps it)."""
    head = b"".join(
        (
            b'{"action":',
            canonical(action),
            b',"agent":',
            agent,
            b',"point":',
            canonical(point),
            b',"principal":',
            principal,
            b',"request":{"chain":',
            canonical(chain),
        )
    )
    tail = b'},"version":"' + INPUT_VERSION.encode() + b'"}'
    return EncodedInput(head + b',"id":' + canonical(request_id) + tail, head + tail)


class PolicyEngine(Protocol):
    async def evaluate(
        self, point: Point, document: dict[str, Any], encoded: EncodedInput | None = None
    ) -> PolicyResult:
        """The decision on ``document``; ``encoded``, if given, is its canonical JSON.

        Awaited: an engine may ask a server. One that answers in-process answers inline
        (a thread hop would cost more than a decision)."""
        ...

    def describe(self, point: Point) -> tuple[str, str]:
        """(policy, version) that decides ``point``, for the audit record."""
        ...


def load_modules(paths: Sequence[Path]) -> list[PolicyModule]:
    """Rego modules from files and folders (``*.rego`` in them, tests excluded)."""
    modules = []
    for path in paths:
        files = sorted(path.glob("*.rego")) if path.is_dir() else [path]
        for file in files:
            if file.name.endswith("_test.rego"):
                continue
            try:
                modules.append(PolicyModule(str(file), file.read_text()))
            except OSError as exc:
                raise ConfigError(f"cannot read policy: {exc.strerror}", file=str(file)) from None
    return modules


def _fill(handle: Any, value: Any) -> int:
    """Push ``value`` onto a regopy input stack; the first failing call's code, or 0."""
    if value is True or value is False:
        return int(_C.regoInputBoolean(handle, value))
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:  # C would wrap it: the policy must see what the tool gets
            raise PolicyFailure("an integer in the policy input is out of range")
        return int(_C.regoInputInt(handle, value))
    if isinstance(value, float):
        return int(_C.regoInputFloat(handle, value))
    if isinstance(value, str):
        if "\x00" in value:  # C would cut it there: the policy must see what the tool gets
            raise PolicyFailure("a string in the policy input holds a NUL character")
        return int(_C.regoInputString(handle, value.encode("utf-8", "surrogatepass")))
    if value is None:
        return int(_C.regoInputNull(handle))
    if isinstance(value, dict):
        for key, item in value.items():
            code = _fill(handle, key) or _fill(handle, item) or _C.regoInputObjectItem(handle)
            if code:
                return int(code)
        return int(_C.regoInputObject(handle, len(value)))
    if isinstance(value, list | tuple):
        for item in value:
            code = _fill(handle, item)
            if code:
                return code
        return int(_C.regoInputArray(handle, len(value)))
    raise PolicyFailure(f"cannot pass a {type(value).__name__} to a policy")


def _input(document: dict[str, Any]) -> Input:
    """``regopy.Input(document)``, built with a third of the calls (the input is most of a decision's cost)."""
    handle = _C.regoNewInput()
    try:
        code = _fill(handle, document)
    except PolicyFailure:
        _C.regoFreeInput(handle)
        raise
    if code:
        _C.regoFreeInput(handle)
        raise PolicyFailure(f"the policy input could not be built (code {code})")
    value: Input = Input.__new__(Input)
    value._impl = handle  # freed by Input.__del__
    return value


def _line_col(source: str, offset: int) -> tuple[int, int]:
    before = source[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def _rego_config_error(exc: RegoError, modules: dict[str, PolicyModule]) -> ConfigError:
    text = str(exc)
    where, what = _ERROR_AT.search(text), _ERROR_MSG.search(text)
    message = what.group(1).strip() if what else "invalid Rego"
    if where and where.group(1) in modules:
        module = modules[where.group(1)]
        line, col = _line_col(module.source, int(where.group(2)))
        return ConfigError(f"line {line}, column {col}: {message}", file=module.path)
    return ConfigError(message, file=", ".join(modules) or None)


# Builtins whose result is not a function of input and data: their policies are never memoised.
_IMPURE = ("time.", "rand.", "uuid.", "http.send", "opa.runtime", "net.lookup", "crypto.")
MEMO_SIZE = 4096


class RegoEngine:
    """regopy, with every decision point compiled once into a bundle.

    Rego is a pure function of input, data and modules, all fixed here but the input: a
    decision on an input seen recently is answered from memory (bounded LRU), unless a
    module calls an impure builtin. The request id is left out of the memo's key unless
    a module reads it, so repeated steps of different requests share entries.
    """

    def __init__(
        self, modules: Sequence[PolicyModule], data: dict[str, Any] | None = None, *, memo: bool = True
    ) -> None:
        sources = "\n".join(m.source for m in modules)
        pure = not any(b in sources for b in _IMPURE)
        self._memo: OrderedDict[bytes, PolicyResult] | None = OrderedDict() if memo and pure else None
        self._keep_request_id = "request.id" in sources
        self._by_package = {m.package: m for m in modules}
        self._rego = Interpreter()
        self._rego.log_level = LogLevel.NONE  # errors are raised, not printed
        by_path = {m.path: m for m in modules}
        try:
            for m in modules:
                self._rego.add_module(m.path, m.source)
            if data:
                self._rego.add_data(data)
            self._points = [p for p in POINTS if f"fleet.{p}" in self._by_package]
            self._bundle = (
                self._rego.build(None, [f"fleet/{p}/decision" for p in self._points])
                if self._points
                else None
            )
        except RegoError as exc:
            raise _rego_config_error(exc, by_path) from None
        # One interpreter holds one input at a time; tools run in threads, policies may too.
        self._lock = threading.Lock()
        # Asked on every decision (its audit record names the policy): worked out once.
        self._described = {
            point: (Path(module.path).name, module.version)
            for point in POINTS
            if (module := self._by_package.get(f"fleet.{point}")) is not None
        }

    def describe(self, point: Point) -> tuple[str, str]:
        return self._described.get(point, ("none", "-"))

    async def evaluate(  # ~17 µs of CPU and no wait: answered inline, no thread hop
        self, point: Point, document: dict[str, Any], encoded: EncodedInput | None = None
    ) -> PolicyResult:
        if point not in self._points or self._bundle is None:
            raise PolicyFailure(f"no policy defines data.fleet.{point}.decision")
        if self._memo is None:
            return self._evaluate(point, document)
        if encoded is None:
            key = self._memo_key(document)
        else:  # the caller encoded it already (for its digest): no second encoding
            key = encoded.whole if self._keep_request_id else encoded.without_request_id
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
                return hit
        result = self._evaluate(point, document)
        with self._lock:
            self._memo[key] = result
            if len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        return result

    def _memo_key(self, document: dict[str, Any]) -> bytes:
        request = document.get("request")
        if isinstance(request, dict) and not self._keep_request_id:
            document = {**document, "request": {k: v for k, v in request.items() if k != "id"}}
        return canonical(document)

    def _evaluate(self, point: Point, document: dict[str, Any]) -> PolicyResult:
        with self._lock:
            try:
                self._rego.set_input(_input(document))
                output = self._rego.query_bundle_entrypoint(self._bundle, f"fleet/{point}/decision")
                ok, text = output.ok(), str(output)
            except RegoError as exc:
                raise PolicyFailure(f"evaluation failed: {str(exc).splitlines()[0][:200]}") from None
        if not ok:
            raise PolicyFailure("evaluation failed (conflicting or erroneous rules)")
        if text == "undefined":
            raise PolicyFailure(f"data.fleet.{point}.decision is undefined for this input")
        return _result(json.loads(text)["expressions"][0])


def _result(value: Any) -> PolicyResult:
    try:
        return PolicyResult.model_validate(value)
    except ValidationError as exc:
        raise PolicyFailure(f"the decision is not {{outcome, reasons}}: {exc.errors()[0]['msg']}") from None


class OpaEngine:
    """An OPA server's Data API: ``POST {url}/v1/data/fleet/<point>/decision``."""

    def __init__(self, url: str, timeout_s: float, versions: dict[str, str] | None = None) -> None:
        self._url = url.rstrip("/")
        # Made here, bound at first use to the loop of the replica that serves with it.
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._versions = versions or {}

    def describe(self, point: Point) -> tuple[str, str]:
        return (f"opa:fleet.{point}", self._versions.get(point, "server"))

    async def evaluate(
        self, point: Point, document: dict[str, Any], encoded: EncodedInput | None = None
    ) -> PolicyResult:
        try:
            response = await self._client.post(
                f"{self._url}/v1/data/fleet/{point}/decision", json={"input": document}
            )
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise PolicyFailure(f"OPA server failed: {type(exc).__name__}") from None
        if "result" not in body:
            raise PolicyFailure(f"data.fleet.{point}.decision is undefined for this input")
        return _result(body["result"])
