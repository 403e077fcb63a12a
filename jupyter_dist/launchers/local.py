"""Start a controller or engines as local processes.

The controller starts in a session of its own (``start_new_session``), so
it outlives the kernel or shell that started it and an interrupt of that
kernel does not reach it. Each process writes its log to a file in the
runtime directory; the command line is logged, never the environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from jupyter_dist.launchers.template import EngineTemplate, ForkedEngine

logger = logging.getLogger(__name__)


class LocalProcess(subprocess.Popen[bytes]):
    """A Popen that remembers where its output goes."""

    log_path: str = ""


def _spawn(
    args: list[str], log_path: Path, new_session: bool, environ: dict[str, str] | None = None
) -> LocalProcess:
    logger.info("starting %s (log %s)", " ".join(args), log_path)
    with open(log_path, "ab") as log:
        process = LocalProcess(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
            close_fds=True,
            env={**os.environ, **environ} if environ else None,
        )
    process.log_path = str(log_path)
    return process


def start_controller(
    cluster_id: str,
    n_engines: int,
    ip: str,
    log_dir: Path,
    log_level: str = "INFO",
    idle_timeout_s: float | None = None,
    memory_limit_bytes: int | None = None,
    engine_gpus: list[str] | None = None,
    preload: Sequence[str] = (),
) -> LocalProcess:
    """Start a detached controller that starts ``n_engines`` local engines itself.

    ``engine_gpus[k]`` is engine k's ``CUDA_VISIBLE_DEVICES`` (GPU UUIDs, not
    secret); ``preload`` names modules the engines' template imports once
    (``"torch"``), so each engine has them without importing them itself.
    """
    args = [
        sys.executable, "-m", "jupyter_dist.cli", "controller",
        "--cluster-id", cluster_id, "-n", str(n_engines), "--ip", ip, "--log-level", log_level,
    ]  # fmt: skip
    if idle_timeout_s is not None:
        args += ["--idle-timeout", str(idle_timeout_s)]
    if memory_limit_bytes is not None:
        args += ["--memory-limit", str(memory_limit_bytes)]
    for visible in engine_gpus or ():
        args += ["--engine-gpus", visible]
    for module in preload:
        args += ["--preload", module]
    return _spawn(args, log_dir / f"jupyter-dist-{cluster_id}-controller.log", new_session=True)


def start_engine(
    connection_path: str,
    engine_id: int | None,
    environ: dict[str, str],
    log_level: str = "INFO",
    preload: Sequence[str] = (),
) -> LocalProcess | ForkedEngine:
    """Start one engine that connects with ``connection_path`` (asking for ``engine_id``).

    ``environ`` is set in the engine before any of its code runs (its
    ``CUDA_VISIBLE_DEVICES``). Forked from this process's engine template
    (started on first use), or started fresh when the template cannot be had.
    """
    log_path = _engine_log_path(connection_path)
    key = (log_level, tuple(preload))
    template = _template_for(key)
    if template is not None:
        request = {"connection_file": connection_path, "engine_id": engine_id, "environ": environ}
        try:
            pid = template.fork({**request, "log_path": str(log_path)})
        except (OSError, TimeoutError) as e:
            logger.warning("the engine template failed (%s); starting engines fresh", e)
            _templates.pop(key, None)
        else:
            logger.info("forked engine pid %d from the template (log %s)", pid, log_path)
            return ForkedEngine(template, pid, str(log_path))
    return _spawn_engine(connection_path, engine_id, environ, log_level, log_path)


# One template per (log level, modules it preloads).
_templates: dict[tuple[str, tuple[str, ...]], EngineTemplate] = {}


def _template_for(key: tuple[str, tuple[str, ...]]) -> EngineTemplate | None:
    """This process's engine template for ``key``, started on first use."""
    template = _templates.get(key)
    if template is not None and template.is_alive():
        return template
    log_level, preload = key
    args = [sys.executable, "-m", "jupyter_dist.cli", "engine-template", "--log-level", log_level]
    for module in preload:
        args += ["--preload", module]
    try:
        template = EngineTemplate(args)
    except OSError as e:
        logger.warning("cannot start the engine template (%s); starting engines fresh", e)
        return None
    _templates[key] = template
    return template


def _engine_log_path(connection_path: str) -> Path:
    stem = Path(connection_path).with_suffix("")
    return Path(f"{stem}-engine-{len(list(stem.parent.glob(stem.name + '-engine-*.log')))}.log")


def _spawn_engine(
    connection_path: str,
    engine_id: int | None,
    environ: dict[str, str],
    log_level: str,
    log_path: Path,
) -> LocalProcess:
    args = [
        sys.executable,
        "-m",
        "jupyter_dist.cli",
        "engine",
        "--connection-file",
        connection_path,
        "--log-level",
        log_level,
    ]
    if engine_id is not None:
        args += ["--engine-id", str(engine_id)]
    return _spawn(args, log_path, new_session=False, environ=environ)
