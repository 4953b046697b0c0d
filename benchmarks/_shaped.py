"""Run a benchmark's two ranks in network namespaces over a shaped link (root)."""

from __future__ import annotations

import json
import os
import random
from typing import Any


def run_pair(script: list[str], rate: str, tmp: str, timeout_s: float) -> Any:
    """Start ``script`` as 2 ranks, one per namespace, over a link shaped to ``rate``
    (``"unshaped"``: the namespaces' link as it is); return what rank 0 wrote to the path
    passed as ``--result``.

    Args:
        script: the command of one rank (interpreter, script and its options).
        rate: a ``tc`` rate such as ``"100mbit"``, or ``"unshaped"``.
        tmp: a directory for the result file.
        timeout_s: seconds before the ranks are killed.
    """
    from commhooks.launch.cli import shaped_commands
    from commhooks.launch.netns import Link, ShapedCluster

    result = os.path.join(tmp, f"{rate}.json")
    cluster = ShapedCluster(2, Link(None if rate == "unshaped" else rate))
    cmds = shaped_commands(cluster, [*script, "--result", result], random.randint(20000, 59999))
    with cluster:
        codes = cluster.run(cmds, env={"OMP_NUM_THREADS": "1"}, timeout_s=timeout_s)
    if any(codes):
        raise RuntimeError(f"{rate}: ranks exited with {codes}")
    with open(result) as f:
        return json.load(f)
