"""``fleet eval --config``: a fleet of its own for the evals, on this machine.

A local Ray cluster (its own temp dir, no dashboard) serves the deploy config's
applications on a free loopback port, with every scripted backend playing the suites'
scripts first and the state (audit log, memory, budgets, approvals) in a temporary
folder, so an eval never writes into the checkout's ``var/``. Everything it started is
stopped when the block ends, failed or not; the folder goes too, unless it failed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve.errors import ConfigError
from serve.models.scripted import ScriptRule

__all__ = ["local_fleet", "with_rules"]

_STATE = {
    ("governance", "audit"): "audit/audit.jsonl",
    ("memory",): "memory/memory.db",
    ("budgets",): "budget/budget.db",
    ("approvals",): "approvals/approvals.db",
}


def with_rules(config: dict[str, Any], rules: list[ScriptRule], state: Path | None = None) -> dict[str, Any]:
    """The deploy config with ``rules`` first in every scripted backend's script, and
    (``state``) its stores' files under that folder."""
    config = copy.deepcopy(config)
    added = [r.model_dump(exclude_defaults=True) for r in rules]
    for app in config.get("applications", []):
        args = app.setdefault("args", {})
        for backend in (args.get("models") or {}).values():
            if backend.get("kind") == "scripted":
                backend["script"] = [*added, *backend.get("script", [])]
        if state is not None:
            for keys, file in _STATE.items():
                section = args
                for key in keys:
                    section = section.setdefault(key, {})
                section["path"] = str(state / app["name"] / file)
    return config


@contextlib.contextmanager
def local_fleet(config_path: Path, rules: list[ScriptRule], timeout_s: float = 300.0) -> Iterator[str]:
    """The config's fleet on a local cluster; yields its base URL."""
    import ray
    from ray import serve as rayserve

    from serve.app import build_app

    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the deploy config: {exc}", file=str(config_path)) from None
    work = Path(tempfile.mkdtemp(prefix="fleet-eval-"))
    config = with_rules(config, rules, state=work / "state")
    port = _free_port()
    env = {
        k: str(v)
        for app in config["applications"]
        for k, v in app.get("runtime_env", {}).get("env_vars", {}).items()
    }
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_LOG_TO_STDERR": "0", **env})
    print(f"starting a local fleet from {config_path} on port {port} ...", file=sys.stderr)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's start-up news is noise here
    ray.init(
        address="local",
        num_cpus=8,  # logical: a fleet's replicas ask 0.1 CPU each and wait on I/O
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        _temp_dir=str(work / "ray"),
    )
    done = False
    try:
        rayserve.start(http_options={"host": "127.0.0.1", "port": port})
        for app in config["applications"]:
            rayserve.run(
                build_app(app["args"]),
                name=app["name"],
                route_prefix=app.get("route_prefix", "/"),
                blocking=False,
            )
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, timeout_s)
        yield url
        done = True
    finally:
        try:
            rayserve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
            if done:  # its state and Ray's logs go; after a failure they stay, for a look
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"the local fleet's logs and state are kept in {work}", file=sys.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"the local fleet did not answer at {url} within {timeout_s:g}s")
