"""Local engines are forked from one template process that imported the engine once."""

from __future__ import annotations

import psutil

import jupyter_dist as jd
from jupyter_dist import connection_file
from tests.waiting import poll_for


def _template(cluster: jd.Cluster) -> psutil.Process:
    parents = {psutil.Process(e.pid).ppid() for e in cluster.status()}
    assert len(parents) == 1, f"engines have several parents: {parents}"
    return psutil.Process(parents.pop())


def test_engines_are_forked_from_one_template_of_the_controller(cluster: jd.Cluster) -> None:
    template = _template(cluster)
    assert "engine-template" in template.cmdline()
    assert template.ppid() == connection_file.read(cluster.connection_file).controller_pid
    pids = cluster.run("import os; os.getpid()")
    assert sorted(pids) == sorted(e.pid for e in cluster.status())


def test_a_forked_engine_killed_is_reported_dead_with_its_signal(
    fresh_cluster: jd.Cluster,
) -> None:
    victim = fresh_cluster.status()[0]
    psutil.Process(victim.pid).kill()
    poll_for(
        lambda: fresh_cluster.status()[0].state == "dead", 10, "the killed engine reported dead"
    )
    assert fresh_cluster.status()[0].exit_code == -9
    assert fresh_cluster[1].run("1 + 1") == 2


def test_the_template_ends_with_its_cluster(fresh_cluster: jd.Cluster) -> None:
    template = _template(fresh_cluster)
    fresh_cluster.stop()
    poll_for(lambda: not template.is_running(), 10, "the engine template exited")


def test_a_stop_ends_engines_without_reporting_them_dead(fresh_cluster: jd.Cluster) -> None:
    log = connection_file.runtime_dir() / f"jupyter-dist-{fresh_cluster.id}-controller.log"
    fresh_cluster.stop()
    poll_for(lambda: "stopped" in log.read_text(), 10, "the controller logged its stop")
    assert "died" not in log.read_text()  # engines told to stop did not die
