"""accelerate under torchrun with a model sharded by fully_shard: register_accelerate hands it
to commhooks.fsdp.register. (accelerate applies its FSDP2 plugin only on GPUs; on this CPU
machine the script shards the model itself, the way the plugin leaves it.)"""

from __future__ import annotations

import gc

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from commhooks.integrations import stats_line
from commhooks.integrations.accelerate import register_accelerate

if __name__ == "__main__":
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 80), nn.Tanh(), nn.Linear(80, 40))
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = accelerator.prepare(torch.optim.Adam(model.parameters(), lr=1e-3))
    state = register_accelerate(accelerator, model, "uniform:bits=4", min_numel=256)
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
