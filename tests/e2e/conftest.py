"""The README's first command, run once for the e2e package: `make up`, then `make down`.

`make up` serves configs/local.yaml: the example fleet on the real vLLM engine (CPU
build) and the embedded SmolLM2-135M-Instruct. This is the test run's one engine.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BASE_URL = "http://127.0.0.1:8000"


def readme_block(lang: str, after: str) -> str:
    start = README.index(after)
    match = re.search(rf"```{lang}\n(.*?)```", README[start:], re.S)
    assert match, f"no {lang} block after {after!r}"
    return match.group(1)


def fresh_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a user who never ran Ray: an empty HOME (no ``~/.ray/auth_token``).

    The integration package's ``ray.init`` makes a token in the real HOME; run there,
    ``make up`` would pass on a machine where it fails for a new user. The model cache
    stays the real one (converting the model again is ``ensure_model``'s own test)."""
    home = tmp_path_factory.mktemp("home")
    cache = os.environ.get("FLEET_MODEL_CACHE") or str(Path.home() / ".cache" / "fleet" / "models")
    return {**os.environ, "HOME": str(home), "FLEET_MODEL_CACHE": cache}


def refuse_if_taken(ports: dict[int, str]) -> None:
    """The README's fleet needs its ports: a fleet already running here is not the tests' to stop."""
    for port, what in ports.items():
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(
                    f"port {port} ({what}) is in use: the e2e tests run the README's `make up` there and "
                    "will not redeploy or stop a fleet they did not start; stop it (`make down`) first",
                    pytrace=False,
                )


@pytest.fixture(scope="package")
def up_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment `make up` ran in (its HOME holds the cluster's Ray token): commands
    that reach the cluster through Ray (`fleet approvals` as the operator) run in it too."""
    return fresh_home(tmp_path_factory)


@pytest.fixture(scope="package")
def fleet_up(tmp_path_factory: pytest.TempPathFactory, up_env: dict[str, str]) -> Iterator[str]:
    log = tmp_path_factory.mktemp("e2e") / "make-up.log"
    env = up_env
    refuse_if_taken({8000: "the fleet's HTTP", 8265: "Ray's dashboard", 6379: "Ray's GCS"})
    commands = readme_block("bash", "## Two commands on a fresh machine")
    up = next(line.split("#")[0].strip() for line in commands.splitlines() if line.startswith("make up"))
    try:
        with log.open("w") as out:
            done = subprocess.run(
                up, shell=True, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800
            )
        text = log.read_text()
        assert done.returncode == 0, text[-3000:]
        assert f"Fleet is up: {BASE_URL}/v1" in text
        yield text
    finally:
        subprocess.run("make down", shell=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
