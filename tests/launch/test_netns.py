"""The shaped local cluster, for real: namespaces, veths, a bridge, tc, and teardown (root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from commhooks.launch.netns import Link, ShapedCluster

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 40123)); s.listen(1); s.settimeout(60)
    c, _ = s.accept(); n = 0
    while (b := c.recv(1 << 16)):
        n += len(b)
    print(n)
""")
CLIENT = textwrap.dedent("""
    import socket, sys, time
    for _ in range(300):  # the server may not listen yet: retry for up to 30 s
        try:
            c = socket.create_connection((sys.argv[1], 40123), timeout=60); break
        except OSError:
            time.sleep(0.1)
    c.sendall(b"x" * int(sys.argv[2])); c.close()
""")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _transfer(cluster: ShapedCluster, src: int, dst: int, nbytes: int) -> int:
    """Send ``nbytes`` over TCP from namespace ``src`` to ``dst``; the bytes ``dst`` received."""
    server = subprocess.Popen(
        [*cluster.exec_prefix(dst), sys.executable, "-c", SERVER, cluster.addr(dst)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        subprocess.run(
            [*cluster.exec_prefix(src), sys.executable, "-c", CLIENT, cluster.addr(dst),
             str(nbytes)],
            check=True, timeout=60,
        )  # fmt: skip
        out, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    return int(out)


@root_only
def test_two_namespaces_on_a_shaped_veth_pair_then_nothing_left() -> None:
    with ShapedCluster(2, Link("200mbit")) as cluster:
        assert "chk0" in _namespaces() and "chk1" in _namespaces()
        before = cluster.counters()
        assert _transfer(cluster, 0, 1, 2_000_000) == 2_000_000
        after = cluster.counters()
        assert after[0][0] - before[0][0] >= 2_000_000  # tx of namespace 0
        assert after[1][1] - before[1][1] >= 2_000_000  # rx of namespace 1
        qdisc = subprocess.run(
            [*cluster.exec_prefix(0), "tc", "qdisc", "show", "dev", cluster.iface(0)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "tbf" in qdisc and "200Mbit" in qdisc, qdisc
    assert "chk" not in _namespaces()
    assert "chk" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


@root_only
def test_delay_is_netem_or_a_clear_error() -> None:
    try:
        with ShapedCluster(2, Link("200mbit", delay_ms=2.0)) as cluster:
            qdisc = subprocess.run(
                [*cluster.exec_prefix(1), "tc", "qdisc", "show", "dev", cluster.iface(1)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert "netem" in qdisc and "delay 2ms" in qdisc and "tbf" in qdisc, qdisc
    except RuntimeError as e:  # this project's VM kernel has no sch_netem
        assert "delay_ms=2.0: tc netem failed" in str(e)
    assert "chk" not in _namespaces()


@root_only
def test_three_namespaces_through_a_bridge() -> None:
    with ShapedCluster(3, Link("500mbit")) as cluster:
        assert _transfer(cluster, 2, 0, 500_000) == 500_000
        assert _transfer(cluster, 1, 2, 500_000) == 500_000
    assert "chk" not in _namespaces()


@root_only
def test_nodes_mode_shapes_and_counts_only_the_links_between_nodes() -> None:
    from commhooks.launch.cli import shaped_commands

    with ShapedCluster(2, Link("100mbit"), ranks_per_node=2) as cluster:
        assert cluster.world == 4
        assert all("--nproc_per_node=2" in c for c in shaped_commands(cluster, ["x.py"], 29500))
        before = cluster.counters()
        # Inside a node: through the namespace's own address, so over loopback, unshaped and
        # uncounted: the veths' counters stay put (a timing check would be the load's hostage).
        assert _transfer(cluster, 0, 0, 20_000_000) == 20_000_000
        # (The veths carry a few stray packets of their own, IPv6 neighbour discovery.)
        moved = [b - a for now, then in zip(cluster.counters(), before) for b, a in zip(now, then)]
        assert max(moved) < 10_000, moved
        assert _transfer(cluster, 0, 1, 1_000_000) == 1_000_000
        assert cluster.counters()[0][0] - before[0][0] >= 1_000_000
    assert "chk" not in _namespaces()


@root_only
def test_a_crashed_runs_namespaces_are_removed_at_start() -> None:
    subprocess.run(["ip", "netns", "add", "chk7"], check=True)
    try:
        with ShapedCluster(2):
            assert "chk7" not in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", "chk7"], capture_output=True)
    assert "chk" not in _namespaces()


@root_only
def test_a_second_cluster_waits_for_the_first_and_says_why_it_gave_up() -> None:
    with ShapedCluster(2):
        second = ShapedCluster(2, lock_timeout_s=1.0)
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match=r"lock_timeout_s=1\.0: another shaped cluster"):
            second.up()
        assert time.perf_counter() - t0 >= 1.0
        assert "chk0" in _namespaces()  # the first cluster is untouched
    with ShapedCluster(2, lock_timeout_s=1.0):  # free again once the first is down
        assert "chk1" in _namespaces()
    assert "chk" not in _namespaces()


@root_only
def test_ranks_run_one_per_namespace_and_time_out() -> None:
    with ShapedCluster(2) as cluster:
        code = "import os; raise SystemExit(int(os.environ['GLOO_SOCKET_IFNAME'][3]))"
        assert cluster.run([[sys.executable, "-c", code]] * 2) == [0, 1]
        with pytest.raises(TimeoutError):
            cluster.run([[sys.executable, "-c", "import time; time.sleep(60)"]] * 2, timeout_s=1)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
def test_without_root_it_refuses_clearly() -> None:
    code = "from commhooks.launch.netns import ShapedCluster; ShapedCluster(2).up()"
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode != 0
    assert "PermissionError: the shaped cluster needs root" in res.stderr


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"rate": "fast"}, "rate"), ({"delay_ms": -1.0}, "delay_ms")]
)
def test_bad_link_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Link(**kwargs)


def test_bad_size_names_the_field() -> None:
    with pytest.raises(ValueError, match="n=1"):
        ShapedCluster(1)
    with pytest.raises(ValueError, match="ranks_per_node=0"):
        ShapedCluster(2, ranks_per_node=0)
