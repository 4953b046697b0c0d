"""DDP training with a commhooks compression hook, under torchrun, mpirun or a shaped cluster.

    torchrun --standalone --nproc_per_node=4 examples/ddp_train.py --compressor topk:ratio=0.01
    torchrun ... examples/ddp_train.py --compressor powersgd:rank=4 --start-iter 20 --wrapper fp16
    commhooks-launch mpirun --np 2 -- examples/ddp_train.py --epochs 1

Each rank trains on its non-IID share (Dirichlet) of scikit-learn's digits; rank 0 prints the
test accuracy and the hook's byte counts. Every option of commhooks.ddp.HookOptions that a
user tunes often is a flag here.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn

import commhooks.ddp
import commhooks.mpi
from commhooks.data import dirichlet_split, load_digits


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--compressor", default="topk:ratio=0.01", help="a spec; 'dense' for none")
    ap.add_argument(
        "--error-feedback", default="auto", choices=("auto", "on", "off"), help="error feedback"
    )
    ap.add_argument("--start-iter", type=int, default=0, help="dense steps before compressing")
    ap.add_argument("--transport", default="auto", help="allreduce, allgather, reducescatter")
    ap.add_argument("--min-numel", type=int, default=1024, help="smaller tensors go dense")
    ap.add_argument("--wrapper", default=None, choices=("fp16", "bf16"), help="cast wrapper")
    ap.add_argument("--log-every", type=int, default=0, help="log the stats every N steps")
    ap.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet: smaller = more skew")
    args = ap.parse_args()

    commhooks.mpi.init_from_launcher("gloo")  # torchrun's variables, or mpirun's through mpi4py
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    x_tr, y_tr, x_te, y_te = load_digits()
    shard = dirichlet_split(y_tr, world, args.alpha)[rank]
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    )
    state = None
    if args.compressor != "dense":
        ef = {"auto": "auto", "on": True, "off": False}[args.error_feedback]
        state = commhooks.ddp.register(
            model, args.compressor, wrapper=args.wrapper, error_feedback=ef,
            start_iter=args.start_iter, transport=args.transport, min_numel=args.min_numel,
            log_every=args.log_every,
        )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    for _ in range(args.epochs * (len(y_tr) // (32 * world))):
        idx = shard[torch.randint(len(shard), (32,), generator=g)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
    if rank == 0:
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item() * 100
        print(f"compressor={args.compressor} test accuracy {acc:.2f}%")
        if state is not None:
            s = state.stats()
            print(
                f"raw {s.raw_bytes:,} B, wire {s.wire_bytes:,} B, ratio {s.ratio:.1f}x "
                f"(last step {s.last_ratio:.1f}x)"
            )
    # Leave together: a rank tearing gloo down while another still evaluates can abort. Free
    # the DDP model (a reference cycle with its hook's state) while the group lives: freed at
    # exit instead, gloo can abort the process.
    dist.barrier()
    del model, opt, state
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
