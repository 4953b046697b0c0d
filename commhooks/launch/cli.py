"""``commhooks-launch``: start a training script under torchrun, horovodrun, mpirun, or on a
bandwidth-shaped local cluster, printing the exact command first (``--dry-run``: only print).

examples:
    commhooks-launch torchrun --nproc 4 -- train.py --compressor topk
    commhooks-launch torchrun --nproc 4 --nnodes 2 --rdzv-endpoint node0:29400 -- train.py
    commhooks-launch horovodrun --np 4 --controller mpi -- train_hvd.py
    commhooks-launch mpirun --np 4 -- train.py            # train.py: commhooks.mpi
    commhooks-launch shaped --n 4 --rate 100mbit -- train.py   # root: 4 namespaces, 1 rank each
    commhooks-launch cleanup                              # remove a crashed run's namespaces

Every example in examples/ runs under torchrun, mpirun and shaped (they start
torch.distributed with commhooks.mpi.init_from_launcher); examples/horovod_train.py runs
under horovodrun.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import textwrap

from commhooks.launch import commands
from commhooks.launch.netns import Link, ShapedCluster, remove_stale

__all__ = ["main", "shaped_commands"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help, descriptions and epilogs printed as written."""


def shaped_commands(cluster: ShapedCluster, script: list[str], port: int) -> list[list[str]]:
    """One torchrun per namespace (``cluster.ranks_per_node`` processes each), static
    rendezvous at namespace 0's address.

    Args:
        cluster: the namespaces; node ``i`` runs in namespace ``i``.
        script: the training script and its arguments.
        port: rank 0's rendezvous port.
    """
    return [
        [
            commands.executable("torchrun"),
            f"--nnodes={cluster.n}",
            f"--node_rank={i}",
            f"--nproc_per_node={cluster.ranks_per_node}",
            f"--master_addr={cluster.addr(0)}",
            f"--master_port={port}",
            *script,
        ]
        for i in range(cluster.n)
    ]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each launcher's subparser (for usage errors)."""
    summary, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(
        prog="commhooks-launch",
        description=textwrap.fill(" ".join(summary.replace("``", "").split()), 88),
        formatter_class=_Formatter,
        epilog=rest.strip(),
    )
    sub = ap.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    subs: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        p.add_argument("--dry-run", action="store_true", help="print the command and run nothing")
        p.add_argument(
            "script",
            nargs=argparse.REMAINDER,
            help="after --: the training script and its arguments",
        )
        subs[name] = p
        return p

    p = add("torchrun", "Start the script with torchrun, on one node or several (c10d rendezvous).")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) per node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument(
        "--rdzv-endpoint",
        default=None,
        help="host:port of the c10d rendezvous, the same on every node (multi-node only)",
    )
    p.add_argument(
        "--rdzv-id",
        default="commhooks",
        help="rendezvous id shared by the nodes of one job (multi-node; SLURM: $SLURM_JOB_ID)",
    )
    p = add("horovodrun", "Start the script with horovodrun, gloo or MPI controller.")
    p.add_argument("--np", type=int, default=2, help="total number of ranks")
    p.add_argument(
        "--controller", choices=("gloo", "mpi"), default="gloo", help="Horovod's controller"
    )
    p.add_argument("--hosts", default=None, help="hosts and slots as horovodrun -H, e.g. a:4,b:4")
    p = add(
        "mpirun",
        "Start the script with Open MPI's mpirun; the script starts torch.distributed with "
        "commhooks.mpi (or uses Horovod).",
    )
    p.add_argument("--np", type=int, default=2, help="total number of ranks")
    p.add_argument("--hosts", default=None, help="hosts and slots as mpirun -H, e.g. a:4,b:4")
    p = add(
        "shaped",
        "Start N network namespaces joined by shaped links, one torchrun rank in each "
        "(needs root).",
    )
    p.add_argument("--n", type=int, default=2, help="number of namespaces, one rank each")
    p.add_argument(
        "--rate",
        default=None,
        help="tc rate of every link, e.g. 100mbit or 1gbit; None leaves the links unshaped",
    )
    p.add_argument(
        "--delay-ms", type=float, default=0.0, help="added one-way delay per link (needs netem)"
    )
    p.add_argument(
        "--timeout-s", type=float, default=1800.0, help="kill the ranks after this many seconds"
    )
    subs["cleanup"] = sub.add_parser(
        "cleanup",
        help="Remove the namespaces and links a crashed shaped run left behind.",
        formatter_class=_Formatter,
    )
    return ap, subs


def _build(args: argparse.Namespace, script: list[str]) -> list[str]:
    """The launcher command for ``args`` (ValueError on bad values)."""
    if args.launcher == "torchrun":
        return commands.torchrun(
            script, args.nproc, args.nnodes, args.rdzv_endpoint, rdzv_id=args.rdzv_id
        )
    if args.launcher == "horovodrun":
        return commands.horovodrun(script, args.np, args.controller, args.hosts)
    return commands.mpirun(script, args.np, args.hosts)


def _run_shaped(args: argparse.Namespace, cluster: ShapedCluster, script: list[str]) -> int:
    cmds = shaped_commands(cluster, script, random.randint(20000, 59999))
    link = f"{args.rate or 'unshaped'}, +{args.delay_ms} ms"
    print(f"# {args.n} namespaces chk0..chk{args.n - 1}, {link}", file=sys.stderr)
    for i, c in enumerate(cmds):
        print(commands.quote([*cluster.exec_prefix(i), *c]), file=sys.stderr)
    if args.dry_run:
        return 0
    with cluster:
        codes = cluster.run(cmds, timeout_s=args.timeout_s)
    return max(codes, key=abs)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), print the command, run it; return its exit
    status. Bad arguments exit 2 with a usage message."""
    ap, subs = _parser()
    args = ap.parse_args(argv)
    if args.launcher == "cleanup":
        print("removed:", " ".join(remove_stale()) or "nothing")
        return 0
    usage = subs[args.launcher]
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        usage.error("give the training script after --")
    try:
        if args.launcher == "shaped":
            cluster = ShapedCluster(args.n, Link(args.rate, args.delay_ms))
        else:
            cmd = _build(args, script)
    except ValueError as e:
        usage.error(str(e))
    if args.launcher == "shaped":
        return _run_shaped(args, cluster, script)
    print(commands.quote(cmd), file=sys.stderr)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
