"""A bandwidth-shaped local cluster: N network namespaces on shaped links, each one rank or one
node of several ranks (which then talk over the namespace's loopback, unshaped).

Needs root (``ip netns``, ``tc``). Everything it creates carries the ``chk`` prefix, is removed
at start if a crashed run left it behind, and is removed again on exit, on error and on
SIGINT/SIGTERM. One cluster is up at a time on a machine: a second one (another test or
benchmark process) waits on a lock file until the first is down, since both would use the same
names.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType

__all__ = ["Link", "ShapedCluster", "remove_stale"]

logger = logging.getLogger(__name__)

PREFIX = "chk"
BRIDGE = f"{PREFIX}br"
SUBNET = "10.213.0"
LOCK_FILE = "/run/lock/commhooks-shaped-cluster.lock"
_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


@dataclass(frozen=True)
class Link:
    """How every interface is shaped.

    Args:
        rate: tc rate such as ``"100mbit"`` or ``"1gbit"``; None leaves the link unshaped.
        delay_ms: one-way delay added on every interface (netem), so a round trip between two
            ranks costs ``2 * delay_ms`` (four times through a bridge: each hop adds it).
    """

    rate: str | None = None
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.rate is not None and not _RATE.match(self.rate):
            raise ValueError(f"rate={self.rate!r}: expected a tc rate such as '100mbit' or '1gbit'")
        if not 0.0 <= self.delay_ms <= 10_000.0:
            raise ValueError(f"delay_ms={self.delay_ms}: must be in [0, 10000]")

    @property
    def bits_per_s(self) -> float | None:
        if self.rate is None:
            return None
        m = _RATE.match(self.rate)
        assert m is not None
        return float(self.rate[: m.start(2)]) * _UNITS[m.group(2)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _own_namespaces() -> list[str]:
    out = _ip("netns", "list").stdout
    return [w.split()[0] for w in out.splitlines() if re.match(rf"^{PREFIX}\d+\b", w)]


def remove_stale() -> list[str]:
    """Delete namespaces, veths and the bridge a previous run of ours left behind."""
    gone = []
    for ns in _own_namespaces():
        _ip("netns", "delete", ns, check=False)
        gone.append(ns)
    links = _ip("-o", "link", "show").stdout
    for name in re.findall(rf"^\d+: ({PREFIX}[\w-]+)[@:]", links, re.M):
        _ip("link", "delete", name, check=False)
        gone.append(name)
    return gone


class ShapedCluster:
    """N namespaces ``chk0..chk{N-1}`` with addresses ``10.213.0.{1..N}``, joined by a veth pair
    (N = 2) or veths to the bridge ``chkbr`` (N > 2), every interface shaped by ``link``.

    Use as a context manager; :meth:`run` starts one command per namespace.

    Args:
        n: the number of namespaces (ranks, or nodes), 2 to 64.
        link: the shaping of every interface.
        lock_timeout_s: how long :meth:`up` waits for another process's cluster to come down
            before raising TimeoutError.
        ranks_per_node: ranks each namespace runs: the "nodes x ranks per node" mode. Ranks of
            one namespace reach each other through its own address, which the kernel routes
            over loopback: unshaped and not in :meth:`counters`, so only the links between
            nodes are shaped and counted (as NVLink or PCIe inside a node against Ethernet
            between nodes).
    """

    def __init__(
        self,
        n: int,
        link: Link | None = None,
        ranks_per_node: int = 1,
        lock_timeout_s: float = 3600.0,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 64:
            raise ValueError(f"n={n!r}: must be an int in [2, 64]")
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int):
            raise ValueError(f"ranks_per_node={ranks_per_node!r}: must be an int")
        if not 1 <= ranks_per_node <= 64:
            raise ValueError(f"ranks_per_node={ranks_per_node}: must be in [1, 64]")
        self.n = n
        self.ranks_per_node = ranks_per_node
        self.link = link or Link()
        self.lock_timeout_s = lock_timeout_s
        self._up = False
        self._lock: int | None = None
        self._old_handlers: dict[int, object] = {}

    @property
    def world(self) -> int:
        """Ranks in all: namespaces x ranks per namespace."""
        return self.n * self.ranks_per_node

    # -- names ------------------------------------------------------------------------------

    def namespace(self, i: int) -> str:
        return f"{PREFIX}{i}"

    def iface(self, i: int) -> str:
        """The interface inside namespace ``i``."""
        return f"{PREFIX}{i}-v"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(i)]

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> ShapedCluster:
        self.up()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError(
                "the shaped cluster needs root: it creates network namespaces and tc qdiscs "
                "(run as root, or without the shaped link)"
            )
        self._acquire()
        try:
            stale = remove_stale()
        except BaseException:
            self._release()
            raise
        if stale:
            logger.info("removed stale %s", " ".join(stale))
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self._up = True
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _acquire(self) -> None:
        os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        end = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    os.close(fd)
                    raise TimeoutError(
                        f"lock_timeout_s={self.lock_timeout_s}: another shaped cluster held "
                        f"{LOCK_FILE} all that time"
                    ) from None
                time.sleep(0.5)
        self._lock = fd

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.down()
        raise KeyboardInterrupt(f"signal {signum}")

    def down(self) -> None:
        if not self._up:
            return
        remove_stale()
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old_handlers.clear()
        self._up = False
        self._release()

    def _build(self) -> None:
        for i in range(self.n):
            _ip("netns", "add", self.namespace(i))
            _ip("-n", self.namespace(i), "link", "set", "lo", "up")
        if self.n == 2:
            _ip("link", "add", self.iface(0), "type", "veth", "peer", "name", self.iface(1))
            for i in range(2):
                _ip("link", "set", self.iface(i), "netns", self.namespace(i))
        else:
            _ip("link", "add", BRIDGE, "type", "bridge")
            _ip("link", "set", BRIDGE, "up")
            for i in range(self.n):
                peer = f"{PREFIX}{i}-b"
                _ip("link", "add", self.iface(i), "type", "veth", "peer", "name", peer)
                _ip("link", "set", self.iface(i), "netns", self.namespace(i))
                _ip("link", "set", peer, "master", BRIDGE)
                _ip("link", "set", peer, "up")
                self._shape([], peer)
        for i in range(self.n):
            ns = ["-n", self.namespace(i)]
            _ip(*ns, "addr", "add", f"{self.addr(i)}/24", "dev", self.iface(i))
            _ip(*ns, "link", "set", self.iface(i), "up")
            self._shape(self.exec_prefix(i), self.iface(i))

    def _shape(self, prefix: list[str], dev: str) -> None:
        link = self.link
        tc = [*prefix, "tc", "qdisc", "add", "dev", dev]
        parent = ["root"]
        if link.delay_ms:
            res = subprocess.run(
                [*tc, "root", "handle", "1:", "netem", "delay", f"{link.delay_ms}ms"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if res.returncode:
                raise RuntimeError(
                    f"delay_ms={link.delay_ms}: tc netem failed ({res.stderr.strip()}); this "
                    "kernel may lack sch_netem. Shape the rate alone with delay_ms=0"
                )
            parent = ["parent", "1:1", "handle", "10:"]
        if link.bits_per_s is not None:
            # The bucket holds at least a 64 KiB GSO segment (tbf drops anything larger) and
            # about 10 ms at the rate, so the shaper is smooth at 1 Gbit/s too.
            burst = max(256 * 1024, int(link.bits_per_s / 8 / 100))
            subprocess.run(
                [*tc, *parent, "tbf", "rate", link.rate, "burst", str(burst), "latency", "200ms"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip

    # -- using it -------------------------------------------------------------------------------

    def counters(self) -> list[tuple[int, int]]:
        """(tx_bytes, rx_bytes) of each namespace's interface."""
        out = []
        for i in range(self.n):
            stats = f"/sys/class/net/{self.iface(i)}/statistics"
            res = subprocess.run(
                [*self.exec_prefix(i), "cat", f"{stats}/tx_bytes", f"{stats}/rx_bytes"],
                capture_output=True, text=True, check=True, timeout=30,
            )  # fmt: skip
            tx, rx = (int(v) for v in res.stdout.split())
            out.append((tx, rx))
        return out

    def run(
        self,
        commands: Sequence[Sequence[str]],
        env: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
    ) -> list[int]:
        """Run ``commands[i]`` in namespace ``i`` (all at once) and return their exit codes.

        Each gets ``GLOO_SOCKET_IFNAME`` (its interface) and ``MASTER_ADDR`` (rank 0's address)
        on top of ``env``. Past ``timeout_s`` every command is killed and TimeoutError raised.
        """
        if len(commands) != self.n:
            raise ValueError(f"commands: expected {self.n}, one per namespace, got {len(commands)}")
        procs = []
        for i, cmd in enumerate(commands):
            e = {**os.environ, **(env or {})}
            e.update(GLOO_SOCKET_IFNAME=self.iface(i), MASTER_ADDR=self.addr(0))
            procs.append(
                subprocess.Popen([*self.exec_prefix(i), *cmd], env=e, start_new_session=True)
            )
        end = time.monotonic() + timeout_s
        try:
            for p in procs:
                p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"ranks still running after {timeout_s:.0f}s") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        return [p.returncode for p in procs]
