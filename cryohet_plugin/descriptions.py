"""The method descriptions as the engine that runs tells them (``cryohet describe``), cached.

The engine may live in another environment than Scipion (``CRYOHET_PYTHON``, ``CRYOHET_ENV_ACTIVATION``), with
another cryohet version, so the forms are built from what that engine says, never from the cryohet package
beside Scipion. Scipion imports every plugin's protocols in each of its processes (the GUI, every protocol
run), and importing the method modules pulls in torch (seconds), so the plugin asks the engine for
``describe --key`` (tens of ms: no method is imported) and reads ``descriptions-<key>.json`` from the cache, or
writes it from ``describe --json`` (once per engine version or edit). A cache that cannot be written is skipped.

When the engine cannot be asked (no such python, cryohet missing there), the descriptions of the cryohet package
beside Scipion are used with a warning, so that the GUI still opens; ``Plugin.validateInstallation`` names the
problem and no protocol launches.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from cryohet.describe import from_json, to_json
from cryohet.methods.base import Method, pick_method

logger = logging.getLogger(__name__)

#: Engine command (as a tuple) -> its descriptions, for the life of this process.
_memo: dict[tuple[str, ...], dict[str, Method]] = {}


class EngineUnreachable(RuntimeError):
    """The configured engine does not answer ``cryohet describe``."""


def cache_dir() -> Path:
    base = os.environ.get("CRYOHET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cryohet")
    return Path(base)


def ask_engine(plugin, *args: str, timeout_s: float = 600) -> str:
    """stdout of ``cryohet describe <args>`` run by ``plugin``'s engine (``cryohet_plugin.Plugin``: its python and
    activation); EngineUnreachable when it fails."""
    cmd = plugin.getEngineCommand(["describe", *args])
    try:
        proc = subprocess.run(cmd, env=plugin.getEnviron(), capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineUnreachable(f"{plugin.describeCommand(cmd)}: {exc}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise EngineUnreachable(f"{plugin.describeCommand(cmd)} failed (exit code {proc.returncode}): "
                                + " / ".join(tail))
    return proc.stdout


def _write_cache(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".descriptions-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        logger.info("cryohet: description cache not written (%s)", exc)


def engine_descriptions(plugin) -> dict[str, Method]:
    """Name -> description, from ``plugin``'s engine (through the cache); EngineUnreachable when it fails."""
    key = ask_engine(plugin, "--key", timeout_s=120).strip()
    path = cache_dir() / f"descriptions-{key}.json"
    if path.is_file():
        try:
            return from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("cryohet: ignoring unreadable description cache %s (%s)", path, exc)
    text = ask_engine(plugin, "--json")
    try:
        methods = from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineUnreachable(f"the engine's `cryohet describe --json` is not readable here ({exc})") from None
    _write_cache(path, text)
    return methods


def load_descriptions(plugin) -> dict[str, Method]:
    """Name -> description from ``plugin``'s engine (``run`` refuses: methods run through the command line)."""
    cmd = tuple(plugin.getEngineCommand(["describe"]))
    if cmd not in _memo:
        try:
            _memo[cmd] = engine_descriptions(plugin)
        except EngineUnreachable as exc:
            from cryohet.methods import all_methods

            logger.warning("cryohet: %s; the forms describe the cryohet beside Scipion instead", exc)
            _memo[cmd] = from_json(to_json(all_methods()))
    return _memo[cmd]


def get_description(plugin, name: str) -> Method:
    return pick_method(load_descriptions(plugin), name)
