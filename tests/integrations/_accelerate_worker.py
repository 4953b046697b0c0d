"""accelerate under torchrun: register_accelerate with a wrapper and hook options."""

from __future__ import annotations

import gc

import torch
from accelerate import Accelerator
from torch import nn

from commhooks.integrations import stats_line
from commhooks.integrations.accelerate import register_accelerate

if __name__ == "__main__":
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 80), nn.Tanh(), nn.Linear(80, 40))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    state = register_accelerate(accelerator, model, "sign", wrapper="fp16", min_numel=256)
    g = torch.Generator().manual_seed(accelerator.process_index)
    for _ in range(5):
        x = torch.randn(16, 40, generator=g)
        opt.zero_grad()
        accelerator.backward(nn.functional.mse_loss(model(x), x))
        opt.step()
    print(stats_line(state, accelerator.process_index), flush=True)
    del model, opt, state
    gc.collect()
    accelerator.end_training()
