"""accelerate: register a commhooks hook on the model accelerate wrapped in DDP.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_ddp.py   # CPU or GPU
    torchrun --standalone --nproc_per_node=2 examples/accelerate_ddp.py          # the same

On a machine without GPUs and without an accelerate config, ``accelerate launch
--num_processes 2`` (with or without ``--cpu``) starts one process; ``--multi_gpu`` makes it
start two, which then train on the CPU over gloo. Each rank prints the hook's stats.
Needs accelerate: pip install accelerate.
"""

from __future__ import annotations

import gc

import torch
from accelerate import Accelerator
from torch import nn

from commhooks.integrations import stats_line
from commhooks.integrations.accelerate import register_accelerate


def main() -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model, opt = accelerator.prepare(model, opt)
    state = register_accelerate(accelerator, model, "topk:ratio=0.05")
    for step in range(20):
        g = torch.Generator().manual_seed(step * 100 + accelerator.process_index)
        x, y = torch.randn(32, 64, generator=g), torch.randint(10, (32,), generator=g)
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        opt.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        opt.step()
    print(stats_line(state, accelerator.process_index), flush=True)
    # Leave cleanly: free the DDP model (it sits in a reference cycle with its hook's state)
    # while the process group lives, then end it; freed at exit instead, gloo can abort.
    del model, opt, state
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
