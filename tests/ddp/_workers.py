"""Worker bodies for the multi-process DDP tests (started by torch.multiprocessing.spawn).

A worker runs a list of *cases* in one process group, so that a test pays the start-up of its
processes once. A case is a dict:

* ``hook``: None (plain DDP), ``("ours", spec, options)`` (spec may be a list, one per rank),
  ``("torch", name)`` for a hook of torch's ``default_hooks``, or ``("powersgd", rank)`` for
  torch's ``powerSGD_hook``;
* ``wrapper``: None, ``"fp16"`` or ``"bf16"`` (ours only);
* ``steps``, ``lr``, ``bucket_cap_mb``, ``ddp`` (extra DDP keyword arguments), ``model``;
* ``accumulate``: micro-batches per step, all but the last under ``no_sync()``;
* ``first_step`` / ``save`` / ``load``: start at a global step, save or load a checkpoint;
* ``inf_at``: the step on which rank 1 feeds an inf (trained under a GradScaler);
* ``nan_at``: the step on which rank 1's gradient of the first layer's weight (in DDP's last
  bucket) gets one NaN, and nothing else (trained under a GradScaler);
* ``errors``: whether the dense error of each averaged bucket is measured.
"""

from __future__ import annotations

import gc
import hashlib
import traceback
from typing import Any

import torch
import torch.distributed as dist
from _spawn import init
from torch import nn

import commhooks.ddp


def make_model(kind: str = "mlp", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "unused":
        # The second head gets no gradient: exercises find_unused_parameters.
        return _TwoHeads()
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        self.unused = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def batch(rank: int, step: int, micro: int = 0, size: int = 16) -> tuple[torch.Tensor, ...]:
    """The (x, y) of a rank, step and micro-batch: the same whenever it is asked for."""
    g = torch.Generator().manual_seed(1_000_003 * rank + 1009 * step + micro)
    return torch.randn(size, 32, generator=g), torch.randint(0, 10, (size,), generator=g)


def train_alone(ddp: nn.Module, steps: int, first: int = 0) -> None:
    """``steps`` SGD steps of rank 0's batches (for one-rank groups)."""
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(first, first + steps):
        x, y = batch(0, step)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts/lists, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in tensors_in(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors_in(v)]
    return []


def _measure_errors(hook: Any, errors: list[float]) -> Any:
    """Wrap ``hook``: also all-reduce the bucket dense (first, on every rank) and record the
    relative error of the hook's average against it."""

    def wrapped(state, bucket):
        dense = bucket.buffer().clone()
        dist.all_reduce(dense)
        dense /= dist.get_world_size()

        def check(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            out = fut.value()
            out = out[0] if isinstance(out, list) else out
            errors.append(float((out - dense).norm() / dense.norm()))
            return out

        return hook(state, bucket).then(check)

    return wrapped


def build(case: dict[str, Any]) -> tuple[nn.parallel.DistributedDataParallel, Any]:
    model = make_model(case.get("model", "mlp"))
    ddp = nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=case.get("bucket_cap_mb", 0.01), **case.get("ddp", {})
    )
    hook = case.get("hook")
    errors: list[float] = []
    ddp._commhooks_errors = errors  # type: ignore[attr-defined]
    state: Any = None
    if hook is None:
        return ddp, None
    if hook[0] == "ours":
        if case.get("errors"):
            state = commhooks.ddp.CompressionState(hook[1], model=ddp, **hook[2])
            ddp.register_comm_hook(state, _measure_errors(commhooks.ddp.compression_hook, errors))
        else:
            state = commhooks.ddp.register(ddp, hook[1], wrapper=case.get("wrapper"), **hook[2])
    elif hook[0] == "torch":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        fn = getattr(default_hooks, hook[1])

        # Called through a function of another name: DDP refuses torch's bf16 hook by name
        # on CPU builds, though gloo reduces bf16 fine.
        def builtin(state, bucket):
            return fn(state, bucket)

        ddp.register_comm_hook(dist.group.WORLD, builtin)
    elif hook[0] == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

        state = ps.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=hook[1],
            start_powerSGD_iter=2,
            use_error_feedback=False,
            warm_start=True,
        )
        fn = ps.powerSGD_hook
        ddp.register_comm_hook(state, _measure_errors(fn, errors) if case.get("errors") else fn)
    return ddp, state


def run_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    hook = case.get("hook")
    if hook is not None and hook[0] == "ours" and isinstance(hook[1], list):
        # A per-rank spec: the config-mismatch tests.
        case = {**case, "hook": ("ours", hook[1][rank], hook[2])}
    ddp, state = build(case)
    opt = torch.optim.SGD(ddp.parameters(), lr=case.get("lr", 0.1), momentum=0.9)
    scaler = (
        torch.amp.GradScaler("cpu", init_scale=2.0**8)
        if "inf_at" in case or "nan_at" in case
        else None
    )
    first = case.get("first_step", 0)
    armed = [False]
    if "nan_at" in case and rank == 1:
        weight = next(ddp.module.parameters())
        weight.register_hook(
            lambda g: g.index_fill(0, torch.tensor([0]), float("nan")) if armed[0] else g
        )
    if "load" in case:
        ckpt = torch.load(case["load"].format(rank=rank), weights_only=False)
        ddp.module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        state.load_state_dict(ckpt["hook"])
    ours = isinstance(state, commhooks.ddp.CompressionState)
    rec: dict[str, list[Any]] = {"params": [], "ef": [], "finite": [], "scale": [], "grads": []}
    for step in range(first, first + case.get("steps", 5)):
        opt.zero_grad()
        micro = case.get("accumulate", 1)
        for m in range(micro):
            x, y = batch(rank, step, m)
            if step == case.get("inf_at") and rank == 1:
                x[0, 0] = float("inf")
            armed[0] = step == case.get("nan_at")
            ctx = ddp.no_sync() if m < micro - 1 else _nullcontext()
            with ctx:
                loss = nn.functional.cross_entropy(ddp(x), y) / micro
                (scaler.scale(loss) if scaler else loss).backward()
        grads = [p.grad for p in ddp.parameters() if p.grad is not None]
        rec["finite"].append(all(bool(torch.isfinite(g).all()) for g in grads))
        if case.get("keep_grads"):
            rec["grads"].append([g.detach().clone() for g in grads])
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            rec["scale"].append(scaler.get_scale())
        else:
            opt.step()
        rec["params"].append(digest(list(ddp.parameters())))
        if ours:
            rec["ef"].append(digest(tensors_in(state.state_dict()["feedback"])))
    if "save" in case:
        torch.save(
            {"model": ddp.module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
            case["save"].format(rank=rank),
        )
    rec["final"] = [p.detach().clone() for p in ddp.parameters()]
    rec["stats"] = state.stats() if ours else None
    rec["errors"] = ddp._commhooks_errors  # type: ignore[attr-defined]
    if ours:
        fb = state.state_dict()["feedback"]
        rec["ef_keys"] = sorted(fb["residuals"]) if fb else []
        rec["ef_dtypes"] = sorted({str(t.dtype) for t in fb["residuals"].values()}) if fb else []
    return rec


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run_cases(rank: int, world: int, store_path: str, out: str, cases: list[dict]) -> None:
    """Run every case in one process group; an exception is recorded as the case's result."""
    init(rank, world, store_path)
    results: list[Any] = []
    try:
        for case in cases:
            try:
                results.append(run_case(rank, case))
            except Exception as e:
                if not case.get("may_fail"):
                    raise
                results.append({"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()})
        torch.save(results, out)
        # Ranks leave together: one tearing gloo down while another still sends aborts it.
        dist.barrier()
    finally:
        gc.collect()  # free DDP/gloo objects while the group lives (see ddp_step.py)
        dist.destroy_process_group()


def run_cases_per_rank(rank: int, world: int, store_path: str, out: str, cases: list) -> None:
    """Rank r runs cases[r] alone (ranks configured differently)."""
    run_cases(rank, world, store_path, out, [cases[rank]])


def tuple_calls(rank: int, world: int, store_path: str, out: str) -> None:
    """Call the hook as compiled autograd's Python reducer does: ``(grad, param)``, in place."""
    init(rank, world, store_path)
    try:
        param = nn.Parameter(torch.zeros(64, 64))
        state = commhooks.ddp.CompressionState(
            "topk:ratio=1.0", min_numel=0, min_ratio=0.0, start_iter=1
        )
        grads = []
        for step in range(3):
            grad = torch.full((64, 64), float(rank + step))
            fut = commhooks.ddp.compression_hook(state, (grad, param))
            assert fut.value() is grad
            grads.append(grad)
        torch.save({"grads": grads, "iteration": state.iteration}, out)
        dist.barrier()
    finally:
        gc.collect()  # free DDP/gloo objects while the group lives (see ddp_step.py)
        dist.destroy_process_group()


def fallback_run(rank: int, world: int, store_path: str, out: str, spec: str, steps: int) -> None:
    """Train a DDP MLP with ``fallback="auto"`` (2 probes a path) next to plain DDP; record
    each bucket's probe report, the parameters' digest, and the residuals left after it."""
    init(rank, world, store_path)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))  # fmt: skip
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.5)
        state = commhooks.ddp.register(ddp, spec, fallback="auto", fallback_probes=2)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        wire = []
        for step in range(steps):
            opt.zero_grad()
            x, y = batch(rank, step)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            wire.append(state.stats().last_wire_bytes)
        report = [
            (b.params, b.choice, b.compressed_ms, b.dense_ms, len(b.compressed_s), len(b.dense_s))
            for b in state.fallback_report()
        ]
        fb = state.feedback.state_dict()["residuals"] if state.feedback is not None else {}
        torch.save(
            {
                "report": report,
                "params": digest(list(ddp.parameters())),
                "residual_keys": sorted(fb),
                "wire": wire,
                "raw": sum(p.numel() * 4 for p in ddp.parameters()),
            },
            out,
        )
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def overlap_run(rank: int, world: int, store_path: str, out: str, spec: str, steps: int) -> None:
    """Train with the hook while its worker is held up during each backward: record whether
    every future was still pending when the hook returned, and the averaged gradients; then
    the same steps with a reference hook that averages each bucket synchronously."""
    import threading

    from commhooks.engine import average_flat

    init(rank, world, store_path)
    try:
        results = {}
        for mode in ("overlap", "sync"):
            ddp = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=0.005)
            state = commhooks.ddp.CompressionState(spec, model=ddp, min_numel=256)
            pending: list[bool] = []

            def spy(st: Any, bucket: dist.GradBucket, pending: list[bool] = pending) -> Any:
                fut = commhooks.ddp.compression_hook(st, bucket)
                if not bucket.is_last():  # the last one waits for the step's jobs
                    pending.append(not fut.done())
                return fut

            def sync(st: Any, bucket: dist.GradBucket) -> Any:
                params = list(bucket.parameters())
                step = st.begin() if bucket.index() == 0 else st.current()
                average_flat(step, bucket.buffer(), [st.key_of(p) for p in params],
                             [p.shape for p in params], final=bucket.is_last())  # fmt: skip
                if bucket.is_last():
                    step.close()
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())
                return fut

            hook = spy if mode == "overlap" else sync
            # torch checks the annotation's class, and this module's annotations are strings.
            hook.__annotations__["bucket"] = dist.GradBucket
            hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]
            ddp.register_comm_hook(state, hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            grads = []
            for step in range(steps):
                opt.zero_grad()
                x, y = batch(rank, step)
                if mode == "overlap":
                    state.bind()  # the engine's group, at the same point on every rank
                    gate = threading.Event()
                    state.worker.submit(lambda gate=gate: gate.wait(30))
                    threading.Timer(0.5, gate.set).start()
                nn.functional.cross_entropy(ddp(x), y).backward()
                grads.append([p.grad.clone() for p in ddp.parameters()])
                opt.step()
            results[mode] = {"grads": grads, "pending": pending, "stats": state.stats()}
        torch.save(results, out)
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def one_rank_hooked(rank: int, world: int, store_path: str, out: str, timeout: float) -> None:
    """Rank 0 registers the hook, the others run plain DDP: record each rank's error and how
    long its first step took, then leave without tearing gloo down (the ranks are out of step,
    so a barrier or destroy could wait on each other)."""
    import os
    import time

    init(rank, world, store_path)
    t0 = time.monotonic()
    res: dict[str, Any] = {"error": ""}
    try:
        ddp = nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=0.01)
        if rank == 0:
            commhooks.ddp.register(ddp, "topk", join_timeout_s=timeout)
        x, y = batch(rank, 0)
        nn.functional.cross_entropy(ddp(x), y).backward()
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["seconds"] = time.monotonic() - t0
    torch.save(res, out)
    os._exit(0)
