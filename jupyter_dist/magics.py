"""The notebook magics: ``%dist``, ``%%distributed`` and ``%autodist``, on the public client API only.

Magics print what the user asked to see (tables, summaries): that is their
output, not logging.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from tqdm.auto import tqdm

import jupyter_dist as jd
from jupyter_dist import connection_file
from jupyter_dist.cli import add_start_options, start_options
from jupyter_dist.errors import describe_exit_code
from jupyter_dist.private_file import write_atomically
from jupyter_dist.quantities import format_duration, format_nbytes
from jupyter_dist.torch_group import TorchGroup

INTERRUPT_GRACE_S = 5.0
LAUNCHERS = ("local",)

# Code run on engines by `%dist who`: the user's names with their type and shape.
WHO_CODE = """[
    (name, type(value).__name__, tuple(shape) if isinstance(shape := getattr(value, "shape", None), tuple) else None)
    for name, value in list(get_ipython().user_ns.items())
    if not name.startswith("_") and name not in get_ipython().user_ns_hidden
]"""


class _HelpShown(Exception):
    """``--help`` was asked for and printed."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad options as IPython usage errors instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message.rstrip('.')}. See `{self.prog} --help`.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise UsageError(message)
        raise _HelpShown


def _engine_ids(text: str) -> list[int]:
    """``0,2`` or ``1:3`` (a slice, end excluded) or ``2``."""
    try:
        if ":" in text:
            start, stop = text.split(":", 1)
            return list(range(int(start or 0), int(stop)))
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of engine ids like 0,2 or a range like 1:3"
        ) from None


def _dist_parser() -> _Parser:
    parser = _Parser(
        prog="%dist", description="Start, connect to and manage a jupyter-dist cluster."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    start = sub.add_parser("start", help="start a controller and engines on this machine")
    start.add_argument("--launcher", default="local", help="where engines run: local (default)")
    add_start_options(start)
    connect = sub.add_parser("connect", help="connect to a running cluster (default: the newest)")
    connect.add_argument("cluster", nargs="?", help="cluster id or connection file")
    sub.add_parser("status", help="list the engines: state, CPU, memory, GPUs, task")
    restart = sub.add_parser("restart", help="replace engines in place (default: the dead ones)")
    restart.add_argument("engines", nargs="?", type=_engine_ids, help="engine ids, e.g. 0,2")
    interrupt = sub.add_parser(
        "interrupt", help="raise KeyboardInterrupt on engines (default: all)"
    )
    interrupt.add_argument("engines", nargs="?", type=_engine_ids, help="engine ids, e.g. 0,2")
    interrupt.add_argument(
        "--kill", action="store_true", help="kill and restart the engines instead"
    )
    sub.add_parser("monitor", help="show the live monitor of engines, GPUs, actors and tasks")
    sub.add_parser("who", help="the names defined on the engines, with type and shape")
    results = sub.add_parser("results", help="recent tasks, or the result of one")
    results.add_argument("task_id", nargs="?", help="the task whose result to fetch")
    sub.add_parser("stop", help="stop the cluster and all its engines")
    return parser


def _distributed_parser() -> _Parser:
    parser = _Parser(prog="%%distributed", description="Run this cell on the engines.")
    parser.add_argument("--targets", type=_engine_ids, help="engine ids: 0,2 or 1:3 (default: all)")
    parser.add_argument("--noblock", action="store_true", help="return a Future at once")
    parser.add_argument(
        "--scatter", metavar="NAME", help="split the notebook's NAME over the engines first"
    )
    parser.add_argument(
        "--gather", metavar="NAME", help="join the engines' NAME into the notebook after"
    )
    parser.add_argument("--local", action="store_true", help="also run the cell in this notebook")
    parser.add_argument(
        "--torch",
        action="store_true",
        help="form a torch.distributed group over the engines first (kept across cells)",
    )
    return parser


def _describe_group(group: TorchGroup, verb: str) -> str:
    engines = ", ".join(f"{e}→rank {r}" for e, r in sorted(group.ranks.items()))
    return (
        f"{verb} the torch.distributed group ({group.backend}, world size {group.world_size}, "
        f"{group.master_addr}:{group.master_port}): engines {engines}."
    )


def _owner_keys() -> list[str]:
    """Names for this notebook that survive a kernel restart: its kernel id and its session."""
    keys = []
    session = os.environ.get("JPY_SESSION_NAME")
    if session:
        keys.append("session-" + session.replace(os.sep, "_"))
    if "ipykernel" in sys.modules:
        from ipykernel.connect import get_connection_file

        with contextlib.suppress(RuntimeError):  # not running in a kernel
            keys.append(Path(get_connection_file()).stem)
    return keys


def _owner_file(key: str) -> Path:
    return connection_file.runtime_dir() / f"jupyter-dist-notebook-{key}.json"


def _idle_lease_text(stop_in_s: float | None) -> str:
    if stop_in_s is None:
        return ""
    return f" (stops itself in {format_duration(stop_in_s)} unless work arrives: idle timeout)"


@magics_class
class DistMagics(Magics):
    """``%dist``, ``%%distributed`` and ``%autodist``."""

    def __init__(self, shell: InteractiveShell) -> None:
        super().__init__(shell)
        self.cluster: jd.Cluster | None = None
        self.is_autodist = False

    # ---- the cluster this notebook uses -------------------------------

    def _require_cluster(self) -> jd.Cluster:
        if self.cluster is None:
            raise UsageError(
                "No cluster yet: start one with `%dist start -n 4` or attach with `%dist connect`."
            )
        return self.cluster

    def _use(self, cluster: jd.Cluster, is_owner: bool) -> None:
        if self.cluster is not None and self.cluster is not cluster:
            self.cluster.close()
        self.cluster = cluster
        assert self.shell is not None
        self.shell.user_ns["dist_cluster"] = cluster
        if is_owner:
            for key in _owner_keys():
                write_atomically(_owner_file(key), json.dumps({"cluster_id": cluster.id}))

    def reattach(self) -> None:
        """After a kernel restart: connect again to the cluster this notebook started, if it runs."""
        for key in _owner_keys():
            path = _owner_file(key)
            if not path.exists():
                continue
            cluster_id = json.loads(path.read_text())["cluster_id"]
            try:
                cluster = jd.Cluster.connect(cluster_id)
            except jd.ClusterError:
                path.unlink(missing_ok=True)
                continue
            self._use(cluster, is_owner=False)
            print(
                f"Reattached to cluster {cluster.id} ({len(cluster.engine_ids)} engines): `dist_cluster`."
            )
            return

    # ---- %dist ----------------------------------------------------------

    @line_magic
    def dist(self, line: str) -> Any:
        """Start, connect to and manage a cluster: ``%dist --help`` lists the commands."""
        try:
            args = _dist_parser().parse_args(line.split())
        except _HelpShown:
            return None
        return getattr(self, f"_dist_{args.command}")(args)

    def _dist_start(self, args: argparse.Namespace) -> None:
        if args.launcher not in LAUNCHERS:
            raise UsageError(
                f"%dist start: launcher {args.launcher!r} is not available; use one of: {', '.join(LAUNCHERS)}."
            )
        if args.n is not None and args.n < 1:
            raise UsageError(f"%dist start: -n must be at least 1, not {args.n}.")
        try:
            cluster = jd.Cluster.start(**start_options(args))
        except jd.LauncherError as e:  # the machine or the options: the message is the story
            raise UsageError(f"%dist start: {e}") from e
        self._use(cluster, is_owner=True)
        n = len(cluster.engine_ids)
        limit = f" of at most {format_nbytes(args.memory_limit)} each" if args.memory_limit else ""
        print(
            f"Started cluster {cluster.id} with {n} engines{limit}; it is `dist_cluster` in this notebook."
        )
        if args.gpus is not None or args.gpus_per_engine is not None:
            for context in cluster.apply(jd.engine_context):
                names = ", ".join(f"{g.name} ({g.uuid})" for g in context.gpus) or "none"
                print(f"  engine {context.engine_id}: {names}")
        if cluster.torch_group is not None:
            print(_describe_group(cluster.torch_group, "Formed"))

    def _dist_connect(self, args: argparse.Namespace) -> None:
        cluster = jd.Cluster.connect(args.cluster)
        self._use(cluster, is_owner=False)
        print(
            f"Connected to cluster {cluster.id} ({len(cluster.engine_ids)} engines): `dist_cluster`."
        )

    def _dist_status(self, args: argparse.Namespace) -> None:
        cluster = self._require_cluster()
        engines = cluster.status()
        print(f"cluster {cluster.id}{_idle_lease_text(cluster.idle_stop_in_s())}")
        limits = {e.memory_limit_bytes for e in engines if e.memory_limit_bytes is not None}
        if limits:
            print("memory limit per engine: " + ", ".join(map(format_nbytes, sorted(limits))))
        print(
            f"{'id':>3} {'host':14} {'pid':>7} {'state':20} {'CPU %':>6} {'RSS MB':>7} {'GPU':14} task"
        )
        for e in engines:
            state = e.state
            if e.state == "dead" and e.exit_code is not None:
                state = f"dead ({describe_exit_code(e.exit_code)})"
            cpu = f"{e.cpu_percent:.0f}" if e.cpu_percent is not None else "-"
            rss = f"{e.rss_bytes / 1e6:.0f}" if e.rss_bytes is not None else "-"
            gpus = (
                ",".join(
                    f"{g['index']}:{'?' if (u := g.get('utilization_percent')) is None else u}%"
                    for g in e.gpus
                )
                or "-"
            )
            task = (e.task_id or "") + (f" (+{e.queued} queued)" if e.queued else "")
            print(
                f"{e.engine_id:>3} {e.host[:14]:14} {e.pid:>7} {state:20} {cpu:>6} {rss:>7} {gpus:14} {task}"
            )

    def _dist_monitor(self, args: argparse.Namespace) -> Any:
        return self._require_cluster().monitor()

    def _dist_restart(self, args: argparse.Namespace) -> None:
        cluster = self._require_cluster()
        ids = args.engines
        if ids is None:
            dead = [e for e in cluster.status() if e.state == "dead"]
            ids = [e.engine_id for e in dead]
            for e in dead:
                cause = (
                    describe_exit_code(e.exit_code) if e.exit_code is not None else "no heartbeat"
                )
                print(f"engine {e.engine_id} (pid {e.pid}) had died: {cause}")
            if not ids:
                print("No engine is dead; name the engines to restart, e.g. `%dist restart 0,2`.")
                return
        group = cluster.restart(ids)
        print(f"Restarted engines {', '.join(map(str, ids))}.")
        if group is not None:
            print(_describe_group(group, "Formed again"))

    def _dist_interrupt(self, args: argparse.Namespace) -> None:
        cluster = self._require_cluster()
        if args.kill:
            ids = args.engines if args.engines is not None else cluster.engine_ids
            cluster.restart(ids)
            print(f"Killed and restarted engines {', '.join(map(str, ids))}.")
        else:
            cluster.interrupt(args.engines)

    def _dist_who(self, args: argparse.Namespace) -> None:
        cluster = self._require_cluster()
        ids = cluster.engine_ids
        per_engine = cluster.run(WHO_CODE)
        seen: dict[tuple[str, str, Any], list[int]] = {}
        for engine_id, names in zip(ids, per_engine, strict=True):
            for name, kind, shape in names:
                seen.setdefault((name, kind, shape), []).append(engine_id)
        if not seen:
            print("No names are defined on the engines yet.")
            return
        print(f"{'name':20} {'type':16} {'shape':14} engines")
        for (name, kind, shape), where in sorted(seen.items(), key=lambda item: item[0][0]):
            engines = "all" if where == ids else ",".join(map(str, where))
            print(f"{name:20} {kind:16} {str(shape) if shape is not None else '':14} {engines}")

    def _dist_results(self, args: argparse.Namespace) -> Any:
        cluster = self._require_cluster()
        if args.task_id:
            return cluster.get_result(args.task_id)
        print(f"{'task':32} {'kind':8} {'engine':>6} {'state':10} finished")
        for t in cluster.history(20):
            finished = time.strftime("%H:%M:%S", time.localtime(t.finished)) if t.finished else ""
            engine = "" if t.engine_id is None else str(t.engine_id)
            print(f"{t.task_id:32} {t.kind:8} {engine:>6} {t.state:10} {finished}")
        return None

    def _dist_stop(self, args: argparse.Namespace) -> None:
        cluster = self._require_cluster()
        cluster.stop()
        for key in _owner_keys():
            _owner_file(key).unlink(missing_ok=True)
        self.cluster = None
        print(f"Stopped cluster {cluster.id}.")

    # ---- %%distributed ------------------------------------------------

    @cell_magic
    def distributed(self, line: str, cell: str) -> Any:
        """Run the cell on every engine (or ``--targets``); ``%%distributed --help`` lists the options."""
        try:
            args = _distributed_parser().parse_args(line.split())
        except _HelpShown:
            return None
        cluster = self._require_cluster()
        assert self.shell is not None
        if args.noblock and args.gather:
            raise UsageError(
                "%%distributed: --gather needs the cell to finish first; drop --noblock."
            )
        if not self._compiles(cell):
            return None
        view = cluster if args.targets is None else cluster[args.targets]
        if args.torch:
            before = cluster.torch_group
            if before is not None and before.engine_ids == view.engine_ids:
                group = view.torch(before.backend, before.timeout_s)  # kept if still whole
            else:
                group = view.torch()
            if group is not None and (before is None or before.key != group.key):
                print(_describe_group(group, "Formed"))
        if args.scatter:
            if args.scatter not in self.shell.user_ns:
                raise UsageError(
                    f"%%distributed: --scatter {args.scatter}: there is no {args.scatter!r} in this notebook."
                )
            view.scatter(args.scatter, self.shell.user_ns[args.scatter])
        future = view.run(cell, block=False, display=True)
        if args.local:
            self.shell.run_cell(cell)  # type: ignore[no-untyped-call]
        if args.noblock:
            return future
        self._wait(cluster, future)
        if args.gather:
            self.shell.user_ns[args.gather] = view.gather(args.gather)
        return None

    def _compiles(self, cell: str) -> bool:
        """Check the cell's syntax here, so a typo shows as a plain SyntaxError at once."""
        assert self.shell is not None
        try:
            compile(self.shell.transform_cell(cell), "<cell>", "exec")  # type: ignore[no-untyped-call]
        except SyntaxError:
            self.shell.showsyntaxerror()  # type: ignore[no-untyped-call]
            return False
        return True

    def _wait(self, cluster: jd.Cluster, future: jd.Future) -> None:
        """Wait with a progress bar (engines done / total); Ctrl-C interrupts the engines."""
        children = getattr(future, "children", [future])
        pending: set[concurrent.futures.Future[Any]] = set(children)
        try:
            with tqdm(total=len(children), desc="engines done", delay=1.0, unit="engine") as bar:
                while pending:
                    done, pending = cluster.wait_any(pending, [f.id for f in children])
                    bar.update(len(done))
        except KeyboardInterrupt:
            self._report_interrupt(cluster, children)
            raise
        future.result()

    def _report_interrupt(self, cluster: jd.Cluster, children: Sequence[jd.Future]) -> None:
        """Say which engines stopped; kill and restart those that ignore it on a second Ctrl-C."""
        concurrent.futures.wait(children, timeout=INTERRUPT_GRACE_S)
        stopped = [f.engine for f in children if f.done()]
        stuck = [f.engine for f in children if not f.done()]
        if stopped:
            print(f"Interrupted engines {', '.join(map(str, stopped))}.", file=sys.stderr)
        if stuck:
            print(
                f"Engines {', '.join(map(str, stuck))} did not stop (stuck in C code?). "
                "Interrupt again to kill and restart them, or `%dist interrupt --kill`.",
                file=sys.stderr,
            )
            try:
                concurrent.futures.wait(children, timeout=INTERRUPT_GRACE_S * 6)
            except KeyboardInterrupt:
                ids = [i for i in stuck if i is not None]
                cluster.restart(ids)
                print(f"Killed and restarted engines {', '.join(map(str, ids))}.", file=sys.stderr)

    # ---- %autodist ------------------------------------------------------

    @line_magic
    def autodist(self, line: str) -> None:
        """Toggle: run every following cell on the engines (``%autodist`` again turns it off)."""
        assert self.shell is not None
        transformers = self.shell.input_transformers_cleanup
        self.is_autodist = not self.is_autodist
        if self.is_autodist:
            self._require_cluster()
            transformers.append(self._to_distributed)
            print("%autodist on: cells run on the engines. `%autodist` turns it off.")
        else:
            if self._to_distributed in transformers:
                transformers.remove(self._to_distributed)
            print("%autodist off: cells run in this notebook.")

    def _to_distributed(self, lines: list[str]) -> list[str]:
        first = lines[0].lstrip() if lines else ""
        if not first or first.startswith(("%autodist", "%dist", "%%")):
            return lines
        return ["%%distributed\n", *lines]


def load(shell: InteractiveShell) -> None:
    """Register the magics and reattach to this notebook's cluster if it still runs."""
    magics = DistMagics(shell)
    shell.register_magics(magics)
    magics.reattach()
