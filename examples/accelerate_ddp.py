"""accelerate: register a commhooks hook on the model accelerate wrapped in DDP.

    accelerate launch --num_processes 2 examples/accelerate_ddp.py
    torchrun --standalone --nproc_per_node=2 examples/accelerate_ddp.py   # the same

accelerate is not a commhooks dependency: pip install accelerate.
"""

from __future__ import annotations

import gc

import torch
from accelerate import Accelerator
from torch import nn

import commhooks.ddp


def main() -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model, opt = accelerator.prepare(model, opt)
    # After prepare(): the model is a DistributedDataParallel when there are several processes.
    state = commhooks.ddp.register(model, "topk:ratio=0.05")
    for step in range(20):
        g = torch.Generator().manual_seed(step * 100 + accelerator.process_index)
        x, y = torch.randn(32, 64, generator=g), torch.randint(10, (32,), generator=g)
        opt.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        opt.step()
    accelerator.print(f"accelerate + commhooks: ratio {state.stats().ratio:.1f}x")
    # Leave cleanly: free the DDP model (it sits in a reference cycle with its hook's state)
    # while the process group lives, then end it; freed at exit instead, gloo can abort.
    del model, opt, state
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
