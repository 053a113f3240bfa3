"""Optimizer steps over micro-batches: gradient accumulation, clipping, the LR schedule.

``grad_accum`` loader batches make one optimizer step (the epoch's last step takes what
is left); under DDP the micro-batches before the last skip the gradient all-reduce
(``no_sync``). Each micro-batch's loss is divided by the number of micro-batches of its
step, so the step's gradient is the mean over them. Checkpoints are written only on step
boundaries, where no gradient is pending. With the defaults (one micro-batch, no
clipping, a constant rate) a step is exactly the plain ``backward(); step()``.
"""

from __future__ import annotations

from contextlib import nullcontext

from tasks.training.lm import lr_factor


class OptimizerSteps:
    def __init__(self, cfg, net, optimizer, scaler, per_epoch: int, task: str):
        self.net, self.optimizer, self.scaler = net, optimizer, scaler
        self.accum = cfg.grad_accum
        self.per_epoch = per_epoch
        lm = task == "causal-lm"
        self.clip = (1.0 if lm else 0.0) if cfg.grad_clip is None else cfg.grad_clip
        self.schedule = ("cosine" if lm else "constant") if cfg.lr_schedule == "auto" else cfg.lr_schedule
        self.warmup, self.min_ratio = cfg.warmup_steps, cfg.min_lr_ratio
        self.base_lrs = [cfg.lr for _ in optimizer.param_groups]  # not the restored groups' (scheduled) rates
        self.total = self.steps_per_epoch * cfg.epochs
        self.lr = self.base_lrs[0] if self.base_lrs else 0.0

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.per_epoch // self.accum)

    def boundary(self, b: int) -> bool:
        """Whether loader batch ``b`` (0-based in the epoch) ends an optimizer step."""
        return (b + 1) % self.accum == 0 or b + 1 == self.per_epoch

    def _group(self, b: int) -> int:
        start = (b // self.accum) * self.accum
        return min(self.accum, self.per_epoch - start)

    def sync(self, b: int):
        """DDP's ``no_sync`` on micro-batches whose gradients are not reduced yet."""
        if self.boundary(b) or not hasattr(self.net, "no_sync"):
            return nullcontext()
        return self.net.no_sync()

    def backward(self, loss, b: int) -> None:
        if self.accum > 1:
            loss = loss / self._group(b)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, step: int) -> None:
        """Optimizer step number ``step`` (0-based over the run): schedule, clip, step, clear."""
        import torch

        if self.schedule != "constant" or self.warmup:
            factor = lr_factor(step, self.total, self.warmup, self.schedule, self.min_ratio)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            self.lr = self.base_lrs[0] * factor
        if self.scaler is not None:
            if self.clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self._params(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self._params(), self.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]
