"""L0 of the benchmark ladder: the least an HTTP echo can cost (raw ASGI under uvicorn)."""

from __future__ import annotations

import json
from typing import Any

REPLY = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}]}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = json.dumps({**REPLY, "model": json.loads(body or b"{}").get("model")}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": payload})
