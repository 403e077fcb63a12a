"""The ``jupyter-dist`` command (also ``jupyter dist``): start, stop, list and inspect clusters.

``controller`` and ``engine`` are the entry points launchers run; they are
the only places that configure logging.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from jupyter_dist import connection_file
from jupyter_dist.errors import JupyterDistError
from jupyter_dist.quantities import argument_type, parse_duration_s, parse_nbytes
from jupyter_dist.torch_group import DEFAULT_TIMEOUT_S

# Modules an engine template may import before forking: large, and safe to fork after.
PRELOADS = ("torch",)
LOG_FORMAT = "%(asctime)s %(name)s [%(process)d] %(levelname)s %(message)s"


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


def _cmd_start(args: argparse.Namespace) -> int:
    from jupyter_dist.client.cluster import Cluster

    cluster = Cluster.start(timeout_s=args.timeout, **start_options(args))
    print(cluster.id)
    cluster.close()
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from jupyter_dist.client.cluster import Cluster

    if args.all:
        targets = [str(path) for path, _ in connection_file.list_running()]
    elif args.cluster:
        targets = [args.cluster]
    else:
        print(
            "Name a cluster to stop (`jupyter-dist list` shows them), or pass --all.",
            file=sys.stderr,
        )
        return 2
    for target in targets:
        cluster = Cluster.connect(target)
        cluster.stop()
        print(f"stopped {cluster.id}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    running = connection_file.list_running()
    if not running:
        print("No clusters are running.")
        return 0
    print(f"{'cluster':10} {'controller pid':>14}  {'address':22} connection file")
    for path, info in running:
        print(
            f"{info.cluster_id:10} {info.controller_pid:>14}  {info.ip + ':' + str(info.client_port):22} {path}"
        )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from jupyter_dist.client.cluster import Cluster

    cluster = Cluster.connect(args.cluster)
    try:
        print(f"cluster {cluster.id} ({cluster.connection_file})")
        print(f"{'id':>3} {'host':16} {'pid':>7} {'state':8} {'CPU %':>6} {'RSS MB':>7}  task")
        for e in cluster.status():
            cpu = f"{e.cpu_percent:.0f}" if e.cpu_percent is not None else "-"
            rss = f"{e.rss_bytes / 1e6:.0f}" if e.rss_bytes is not None else "-"
            print(
                f"{e.engine_id:>3} {e.host[:16]:16} {e.pid:>7} {e.state:8} {cpu:>6} {rss:>7}  {e.task_id or ''}"
            )
    finally:
        cluster.close()
    return 0


def _cmd_controller(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    from jupyter_dist.controller.app import Controller
    from jupyter_dist.launchers import local

    controller = Controller(
        cluster_id=args.cluster_id,
        ip=args.ip,
        start_engine=lambda path, engine_id, environ: local.start_engine(
            path, engine_id, environ, args.log_level, args.preload
        ),
        orphan_timeout_s=args.orphan_timeout,
        idle_timeout_s=args.idle_timeout,
        memory_limit_bytes=args.memory_limit,
        engine_gpus=args.engine_gpus,
    )
    controller.start(args.n)
    controller.serve()
    _exit_now()


def _exit_now() -> NoReturn:
    """End a background process whose sockets and files are closed, without freeing its heap.

    Freeing it took the controller about 1 s of CPU after 40,000 tasks, after
    `Cluster.stop` had returned, and the engine template waited for it: work
    that slowed whatever the user ran next.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cmd_engine(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    from jupyter_dist.engine.app import Engine

    Engine(connection_file.read(args.connection_file), args.engine_id).run()
    return 0


def _cmd_engine_template(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    # Imported here, once: every engine forked below shares these pages.
    from jupyter_dist.engine.app import Engine
    from jupyter_dist.launchers import template

    if (
        "torch" in args.preload
    ):  # a CPU library import: CUDA stays untouched until an engine uses it
        import torch.distributed  # noqa: F401

    def run_engine(request: dict[str, Any]) -> int:
        Engine(connection_file.read(request["connection_file"]), request["engine_id"]).run()
        return 0

    template.serve(run_engine)
    _exit_now()


MEMORY_LIMIT_HELP = (
    "resident memory each engine may use, e.g. 2GB or 1.5GiB; an engine over it is "
    "stopped (its task fails saying so) and started again with the same id"
)


def add_start_options(parser: argparse.ArgumentParser) -> None:
    """The options ``jupyter-dist start`` and ``%dist start`` share, named as in ``Cluster.start``."""
    parser.add_argument(
        "-n",
        type=int,
        default=None,
        help="number of engines (default 4, or one per GPU with --gpus)",
    )
    parser.add_argument(
        "--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--gpus",
        default=None,
        help="GPU engines: 'all', a count (2) or GPU indices (0,3); each engine gets its own",
    )
    parser.add_argument(
        "--gpus-per-engine", type=int, default=None, help="GPUs each engine gets (default 1)"
    )
    parser.add_argument(
        "--torch", action="store_true", help="form a torch.distributed group over the engines"
    )
    parser.add_argument(
        "--torch-timeout",
        type=argument_type(parse_duration_s),
        default=DEFAULT_TIMEOUT_S,
        help="a collective waiting longer than this for a rank fails, e.g. 60 or 5m (default 60 s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=argument_type(parse_duration_s),
        default=None,
        help="stop the cluster after this long without work, e.g. 30m or 2h (default: never)",
    )
    parser.add_argument(
        "--memory-limit", type=argument_type(parse_nbytes), default=None, help=MEMORY_LIMIT_HELP
    )


def start_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Cluster.start``'s keyword arguments from the options ``add_start_options`` parsed."""
    return {
        "n": args.n,
        "ip": args.ip,
        "idle_timeout": args.idle_timeout,
        "memory_limit": args.memory_limit,
        "gpus": args.gpus,
        "gpus_per_engine": args.gpus_per_engine,
        "torch": args.torch,
        "torch_timeout": args.torch_timeout,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter-dist", description="Start and manage jupyter-dist clusters."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="start a detached cluster and print its id")
    start.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the engines"
    )
    add_start_options(start)
    start.set_defaults(run=_cmd_start)

    stop = sub.add_parser("stop", help="stop a cluster and all its engines")
    stop.add_argument("cluster", nargs="?", help="cluster id or connection file")
    stop.add_argument("--all", action="store_true", help="stop every running cluster")
    stop.set_defaults(run=_cmd_stop)

    sub.add_parser("list", help="list running clusters").set_defaults(run=_cmd_list)

    status = sub.add_parser("status", help="show a cluster's engines")
    status.add_argument(
        "cluster", nargs="?", help="cluster id or connection file (default: the newest)"
    )
    status.set_defaults(run=_cmd_status)

    controller = sub.add_parser("controller", help="run a controller (launchers use this)")
    controller.add_argument("--cluster-id", default=None)
    controller.add_argument("-n", type=int, default=0, help="local engines to start")
    controller.add_argument("--ip", default="127.0.0.1")
    controller.add_argument("--log-level", default="INFO")
    controller.add_argument(
        "--orphan-timeout",
        type=float,
        default=20.0,
        help="stop after this many seconds without engines",
    )
    controller.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="stop after this many seconds without work and client requests",
    )
    controller.add_argument(
        "--memory-limit", type=argument_type(parse_nbytes), default=None, help=MEMORY_LIMIT_HELP
    )
    controller.add_argument(
        "--engine-gpus",
        action="append",
        default=None,
        help="CUDA_VISIBLE_DEVICES of the next engine (given once per engine, in id order)",
    )
    controller.add_argument(
        "--preload",
        action="append",
        default=[],
        choices=PRELOADS,
        help="a module the engines' template imports once for all engines (torch)",
    )
    controller.set_defaults(run=_cmd_controller)

    engine = sub.add_parser("engine", help="run an engine (launchers use this)")
    engine.add_argument("--connection-file", required=True)
    engine.add_argument("--engine-id", type=int, default=None)
    engine.add_argument("--log-level", default="INFO")
    engine.set_defaults(run=_cmd_engine)

    engine_template = sub.add_parser(
        "engine-template", help="fork local engines on request (the controller runs this)"
    )
    engine_template.add_argument("--log-level", default="INFO")
    engine_template.add_argument("--preload", action="append", default=[], choices=PRELOADS)
    engine_template.set_defaults(run=_cmd_engine_template)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except JupyterDistError as e:
        print(f"jupyter-dist: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
