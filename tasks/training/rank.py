"""One training rank: the plain function every Dask worker of a training group runs.

All distributed setup is in :func:`_setup`, which derives rank, world size and device;
every side effect after it (checkpoints, artifacts, progress) is limited to rank 0.
Ranks restore the latest checkpoint (model, optimizer, scaler, epoch and batch position)
before the first step, so a retried group resumes where the last checkpoint left it.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from storage import checkpoint as ckpt
from storage.errors import ConfigError
from tasks import attempts
from tasks.models import build_model
from tasks.training.config import TrainConfig
from tasks.training.data import Columns, split_loader, train_loader
from tasks.training.lm import LMSpec, lm_forward, step_loss
from tasks.training.schedule import OptimizerSteps
from tasks.training.evaluate import evaluate as evaluate_split, metric_row
from tasks.training.step import Capture, TrainStep, make_optimizer, resolve_capture, task_loss, use_channels_last


class Reporter(Protocol):
    def progress(self, step: int, total: int, metrics: dict[str, Any]) -> None: ...

    def epoch(self, row: dict[str, Any]) -> None: ...

    def finish(self, history: list[dict[str, Any]]) -> None: ...


@dataclass(frozen=True)
class RankJob:
    config: TrainConfig
    model_name: str
    model_args: dict[str, Any]
    columns: Columns
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    attempt: int = 0
    resume_from: str | None = None
    gang: str | None = None  # the attempt's token (see deployments.gang): a superseded rank stops
    lm: LMSpec | None = None  # causal-lm training: the token column and the data contract's metadata


@dataclass
class RankResult:
    rank: int
    steps: int
    epochs: int
    resumed_from: str | None
    checkpoint: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    worker: str = ""
    attempt: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)  # causal-lm: greedy continuations after training


def _setup(job: RankJob):
    import torch
    import torch.distributed as dist

    cfg = job.config
    torch.set_num_threads(cfg.threads_per_rank)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if cfg.precision == "fp16-mixed" and not use_cuda:
        raise ConfigError("precision fp16-mixed needs a CUDA device; on CPU use bf16-mixed or fp32")
    if job.world_size > 1:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{job.master_addr}:{job.master_port}",
            rank=job.rank,
            world_size=job.world_size,
            timeout=timedelta(seconds=cfg.timeout_s),
        )
    return device


def _teardown(ddp=None) -> None:
    """Leave the process group without deadlocking on the GIL.

    The DDP reducer holds the process group; if the reducer is the last to let go, gloo's
    destructor runs inside the reducer's deallocation, which holds the GIL while it joins
    gloo's threads, and a thread finishing a collective waits for the GIL to free its
    tensors: the rank hangs forever (seen in a resumed group). So the reducer goes first,
    while the group is still registered, and the group is destroyed last, through
    ``destroy_process_group``, whose destructor releases the GIL.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(ddp, DistributedDataParallel):
        ddp.reducer = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _build(job: RankJob, device, capture: Capture = "none"):
    import torch

    cfg = job.config
    torch.manual_seed(cfg.seed)
    model = build_model(job.model_name, job.model_args, storage_options=cfg.storage_options)
    if cfg.init_from and not cfg.init_from.startswith("hf:"):  # an hf: folder's weights are the model's own
        tensors, meta = ckpt.load(cfg.init_from, cfg.storage_options)
        _check_same_model(meta, job, cfg.init_from)
        model.load_state_dict(_prefixed(tensors, "model."))
    lora_layers: list[str] = []
    if cfg.lora_rank:
        from tasks.training.lora import apply_lora

        lora_layers = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.activation_checkpointing:
        from tasks.training.lm import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.to(device)
    use_channels_last(model, device, cfg.precision != "fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, device, capture)
    return model, optimizer, lora_layers


def _check_same_model(meta: dict, job: RankJob, where: str) -> None:
    spec = meta.get("model", {})
    if spec.get("name") != job.model_name or spec.get("args") != job.model_args:
        raise ConfigError(
            f"checkpoint {where!r} holds model {spec.get('name')!r} with {spec.get('args')}, "
            f"not {job.model_name!r} with {job.model_args}"
        )


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """Optimizer state as flat tensors plus JSON (safetensors holds tensors only)."""
    import torch

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    import torch

    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    # How the optimizer runs (fused, capturable, foreach) is this device's choice, not the checkpoint's;
    # set before loading, so that the step counters land where this implementation keeps them.
    groups = [{**saved, **{k: g.get(k) for k in _IMPLEMENTATION}}
              for saved, g in zip(meta["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for param, slots in optimizer.state.items():  # moments in the parameter's layout (channels_last)
        for key, value in slots.items():
            if hasattr(value, "shape") and value.shape == param.shape and value.stride() != param.stride():
                slots[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)  # keeps the strides


_IMPLEMENTATION = ("fused", "capturable", "foreach", "differentiable")


def save_checkpoint(job: RankJob, model, optimizer, scaler, step: int, epoch: int, batch: int,
                    history: list, lora_layers: list[str], loader_state: dict | None,
                    files: dict[str, bytes] | None = None) -> str:
    cfg = job.config
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    meta = {
        "model": {"name": job.model_name, "args": job.model_args},
        "columns": job.columns.record(),
        "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets, "layers": lora_layers}
        if cfg.lora_rank else None,
        "epoch": epoch,
        "batch": batch,
        # Where the epoch stands; every rank rebuilds its own loader state from (epoch, batch).
        "loader": loader_state or {"epoch": epoch, "batches": batch, "seed": cfg.seed,
                                   "world_size": job.world_size, "batch_size": cfg.batch_size},
        "optimizer": opt_meta,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "metrics": history[-1] if history else {},
        "history": history,
        "dataset": cfg.dataset,
        "precision": cfg.precision,
        **model_record(job, model),
    }
    return ckpt.save(cfg.checkpoint_dir, step, tensors, meta, cfg.storage_options, keep_last=cfg.keep_last,
                     files=files)


def model_record(job: RankJob, model) -> dict[str, Any]:
    """What a language model's checkpoint adds for generation: the task, tokenizer, ids,
    context, and for an hf: model its source and architecture (see the data contract)."""
    record: dict[str, Any] = job.lm.checkpoint_meta() if job.lm else {"task": job.columns.task}
    if hasattr(model, "describe"):
        record["hf"] = model.describe()
    return record


def train_rank(job: RankJob, reporter: Reporter | None = None) -> RankResult:
    """Train one rank of a group (the whole job when ``world_size`` is 1).

    A rank of an attempt that a newer one has taken over stops before its next step with
    :class:`~tasks.attempts.Superseded`, so it never writes over its successor's checkpoints.
    """
    with attempts.membership(gang_key(job.config), job.gang):
        return _train_rank(job, reporter)


def gang_key(cfg: TrainConfig) -> str:
    """What an attempt takes over: its checkpoint folder (one run writes there at a time)."""
    return cfg.checkpoint_dir.rstrip("/")


def lm_files(job: RankJob) -> dict[str, bytes]:
    """Files a language model's checkpoints carry: the dataset's tokenizer.json, when it has one."""
    from tasks.training.lm_data import tokenizer_bytes

    data = tokenizer_bytes(job.config.dataset, job.lm, job.config.storage_options)
    return {"tokenizer.json": data} if data is not None else {}


def lm_throughput(model, lm: LMSpec, device, threads: int) -> tuple[float, float]:
    """``(model FLOPs per token, device peak FLOP/s)`` for the MFU column."""
    from tasks.training.lm import flops_per_token, peak_flops

    return flops_per_token(model, lm.seq_len), peak_flops(device, threads)[0]


def _train_rank(job: RankJob, reporter: Reporter | None) -> RankResult:
    import torch

    cfg = job.config
    is_main = job.rank == 0
    report = reporter if (reporter is not None and is_main) else None
    device = _setup(job)
    net = None
    lm = job.lm
    try:
        loader = train_loader(cfg, job.columns, job.rank, job.world_size, device)
        val = split_loader(cfg, job.columns, "val", job.rank, job.world_size, device,
                           max_batch=cfg.batch_size if lm else 1024)
        scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16-mixed" else None
        capture = resolve_capture(cfg.compile, cfg.step_capture, device, job.world_size, scaler is not None)
        model, optimizer, lora_layers = _build(job, device, capture)
        step, start_epoch, start_batch, history, resumed_from = 0, 0, 0, [], None
        latest = job.resume_from
        if latest:
            tensors, meta = ckpt.load(latest, cfg.storage_options)
            _check_same_model(meta, job, latest)
            model.load_state_dict(_prefixed(tensors, "model."))
            _restore_optimizer(optimizer, tensors, meta["optimizer"])
            if scaler is not None and meta.get("scaler"):
                scaler.load_state_dict(meta["scaler"])
            step, start_epoch, start_batch = meta["step"], meta["epoch"], meta["batch"]
            history, resumed_from = meta.get("history", []), latest
        net = model
        if job.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      bucket_cap_mb=cfg.bucket_cap_mb)
            if cfg.grad_compression != "none":
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                hook = default_hooks.bf16_compress_hook if cfg.grad_compression == "bf16" else default_hooks.fp16_compress_hook
                net.register_comm_hook(None, hook)
        amp_dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(cfg.precision)

        def autocast():
            return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

        per_epoch = len(loader)
        steps = OptimizerSteps(cfg, net, optimizer, scaler, per_epoch, "causal-lm" if lm else "classify")
        total_steps = steps.total
        files = lm_files(job) if lm and is_main else None
        lm_rates = lm_throughput(model, lm, device, cfg.threads_per_rank) if lm else None
        checkpoint_url = latest
        train_step = None if lm else TrainStep(
            model, net, optimizer, task_loss(job.columns.task, job.columns.feature, job.columns.label),
            device=device, capture=capture, amp_dtype=amp_dtype, scaler=scaler)
        key = gang_key(cfg)
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            t_epoch = time.perf_counter()
            sums: dict[str, float] = {}  # classifiers: the step's device sums, read every sync_every steps
            seen = 0
            lm_sum = torch.zeros((), dtype=torch.float64, device=device)
            lm_count = torch.zeros((), dtype=torch.float64, device=device)
            loader.set_epoch(epoch)
            if epoch == start_epoch and start_batch:
                loader.load_state_dict(loader.dataset.state_dict(batches=start_batch))
            for b, batch in enumerate(loader, start=loader.consumed):
                attempts.check(key, job.gang)
                if lm is None:  # classifiers: the step without host round trips (tasks.training.step)
                    train_step({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                for k, v in batch.items()})
                    step += 1
                    if train_step.steps >= cfg.sync_every or b + 1 == per_epoch:  # the only reads of the device
                        read = train_step.read()
                        for name, value in read.items():
                            sums[name] = sums.get(name, 0.0) + value
                        if report is not None:
                            report.progress(step, total_steps, {"epoch": epoch + 1,
                                                                "loss": read["loss"] / max(1.0, read["count"])})
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b + 1 < per_epoch and is_main:
                        checkpoint_url = save_checkpoint(job, model, optimizer, scaler, step, epoch, b + 1, history,
                                                         lora_layers, loader.state_dict())
                    continue
                # causal LM: masked next-token loss (tasks.training.lm), accumulation, clipping, schedule
                with steps.sync(b):
                    tokens = batch[lm.column].to(device, non_blocking=True)
                    with autocast():
                        token_loss, token_count = lm_forward(net, tokens, lm)
                    loss = step_loss(token_loss, token_count, job.world_size)
                    lm_sum += token_loss.detach().double()
                    lm_count += token_count
                    seen += len(tokens)
                    steps.backward(loss, b)
                if not steps.boundary(b):
                    continue
                steps.step(step)
                step += 1
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b + 1 < per_epoch and is_main:
                    checkpoint_url = save_checkpoint(job, model, optimizer, scaler, step, epoch, b + 1, history,
                                                     lora_layers, loader.state_dict(), files)
                if report is not None and step % cfg.sync_every == 0:
                    report.progress(step, total_steps, {"epoch": epoch + 1, "loss": loss.item()})
            if lm is None:
                for name, value in train_step.read().items():  # a resumed epoch with nothing left: zeros
                    sums[name] = sums.get(name, 0.0) + value
                seen = sums.get("count", 0.0)
            elapsed = time.perf_counter() - t_epoch
            stats = loader.stats
            val_loss = scores = None
            if lm is not None:
                from tasks.training.lm_data import evaluate, history_row

                val_loss = evaluate(model, val, lm, job.world_size, device, autocast) if val is not None else None
                totals = torch.stack([lm_sum, lm_count]).cpu()
                if job.world_size > 1:
                    import torch.distributed as dist

                    dist.all_reduce(totals)
                history.append(history_row(
                    epoch + 1, totals[0].item(), totals[1].item(), val_loss, seen * lm.data_seq_len * job.world_size,
                    elapsed, stats.stall_s, *lm_rates, job.world_size, seen * job.world_size, steps.lr, stats.hit_rate))
            elif val is not None:
                scores = evaluate_split(model, val, job.columns, job.world_size, device, autocast)
            row = history[-1] if lm is not None else {
                "epoch": epoch + 1,
                **{f"train_{name}": round(value / max(1.0, seen), 5) for name, value in sums.items()
                   if name not in ("count", "steps")},
                **metric_row(scores, job.columns.task == "regression"),
                "samples_per_s": round(seen * job.world_size / max(elapsed, 1e-9), 1),
                "data_stall_share": round(stats.stall_s / max(elapsed, 1e-9), 4),
                "cache_hit_rate": stats.hit_rate,
                "epoch_s": round(elapsed, 3),
            }
            if lm is None:
                history.append(row)
            if is_main:
                checkpoint_url = save_checkpoint(job, model, optimizer, scaler, step, epoch + 1, 0, history,
                                                 lora_layers, None, files)
                if report is not None:
                    report.epoch(row)
        if is_main and cfg.lora_rank:
            from tasks.training.lora import adapter_state

            ckpt.save(f"{cfg.checkpoint_dir}/adapters", step, adapter_state(model),
                      {"model": {"name": job.model_name, "args": job.model_args},
                       "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets,
                                "layers": lora_layers}, "base": cfg.init_from},
                      cfg.storage_options, keep_last=1)
        if report is not None:
            report.finish(history)
        samples = []
        if lm is not None and is_main:
            from tasks.training.lm_data import sample_continuations

            samples = sample_continuations(model, cfg.dataset, lm, (files or {}).get("tokenizer.json"), device,
                                           cfg.storage_options)
            if report is not None and hasattr(report, "samples"):
                report.samples(samples)
        if job.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank done with every collective before any leaves
        return RankResult(job.rank, step, len(history), resumed_from, checkpoint_url, history if is_main else [],
                          worker=f"{socket.gethostname()}:{os.getpid()}", attempt=job.attempt, samples=samples)
    finally:
        _teardown(net)

