"""``commhooks-launch``: start a training script under torchrun, horovodrun, mpirun, or on a
bandwidth-shaped local cluster, printing the exact command first (``--dry-run``: only print).

    commhooks-launch torchrun --nproc 4 -- train.py --compressor topk
    commhooks-launch torchrun --nproc 4 --nnodes 2 --rdzv-endpoint node0:29400 -- train.py
    commhooks-launch horovodrun --np 4 --controller mpi -- train_hvd.py
    commhooks-launch mpirun --np 4 -- train.py            # train.py: commhooks.mpi
    commhooks-launch shaped --n 4 --rate 100mbit -- train.py   # root: 4 namespaces, 1 rank each
    commhooks-launch cleanup                              # remove a crashed run's namespaces
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys

from commhooks.launch import commands
from commhooks.launch.netns import Link, ShapedCluster, remove_stale

__all__ = ["main", "shaped_commands"]


def shaped_commands(cluster: ShapedCluster, script: list[str], port: int) -> list[list[str]]:
    """One single-process torchrun per namespace, static rendezvous at rank 0's address."""
    return [
        [
            commands.executable("torchrun"),
            f"--nnodes={cluster.n}",
            f"--node_rank={i}",
            "--nproc_per_node=1",
            f"--master_addr={cluster.addr(0)}",
            f"--master_port={port}",
            *script,
        ]
        for i in range(cluster.n)
    ]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="commhooks-launch",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    sub = ap.add_subparsers(dest="launcher", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
        p.add_argument("script", nargs=argparse.REMAINDER, help="-- script and its arguments")
        return p

    p = add("torchrun", "torchrun, one node or several (c10d rendezvous)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv-endpoint", default=None, help="host:port (multi-node)")
    p = add("horovodrun", "horovodrun --gloo or --mpi")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--controller", choices=("gloo", "mpi"), default="gloo")
    p.add_argument("--hosts", default=None, help="as horovodrun -H, e.g. a:4,b:4")
    p = add("mpirun", "Open MPI's mpirun (scripts use commhooks.mpi or Horovod)")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--hosts", default=None)
    p = add("shaped", "N namespaces on shaped links, one torchrun rank in each (root)")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--rate", default=None, help="tc rate, e.g. 100mbit, 1gbit (default: none)")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--timeout-s", type=float, default=1800.0)
    sub.add_parser("cleanup", help="remove namespaces and links a crashed shaped run left")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.launcher == "cleanup":
        print("removed:", " ".join(remove_stale()) or "nothing")
        return 0
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        print("commhooks-launch: give the script after --", file=sys.stderr)
        return 2
    if args.launcher == "shaped":
        cluster = ShapedCluster(args.n, Link(args.rate, args.delay_ms))
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
    if args.launcher == "torchrun":
        cmd = commands.torchrun(script, args.nproc, args.nnodes, args.rdzv_endpoint)
    elif args.launcher == "horovodrun":
        cmd = commands.horovodrun(script, args.np, args.controller, args.hosts)
    else:
        cmd = commands.mpirun(script, args.np, args.hosts)
    print(commands.quote(cmd), file=sys.stderr)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
