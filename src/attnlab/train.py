"""A small, readable training loop for the synthetic tasks: AdamW, warm-up + cosine, periodic eval.

Every step draws a fresh seeded batch from the task (infinite data: ``seed`` fixes the whole run),
evaluates every ``eval_every`` steps on one held-out batch drawn from a separate seed, can stop at
a target metric (Zoology stops at 0.99 accuracy), and writes ``model.safetensors`` (weights plus
the model's config in the file's metadata) and ``log.json`` (config, eval history) to ``out_dir``.
The same code runs on CPU and CUDA (``device``).

    task = MQAR(seq_len=64, num_kv_pairs=4, vocab_size=256)
    model = for_task(task, "softmax", d_model=64, n_layers=2)
    result = train(model, task, TrainConfig(steps=600, out_dir="runs/mqar"))
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .models import TinyTransformer

EVAL_SEED = 2**31 - 1  # held-out batches come from seeds no training step uses


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps; each draws a fresh batch
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate (Zoology sweeps 1e-4 .. 1e-2)
    weight_decay: float = 0.1  # Zoology's AdamW setting
    warmup: float = 0.05  # fraction of steps with linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # keeps early spikes from ruining a short run
    eval_every: int = 100
    eval_examples: int = 512
    target: float | None = None  # stop once the eval metric reaches this (accuracy >= / mse <=)
    seed: int = 0
    device: str = "cpu"
    out_dir: str | None = None  # where model.safetensors and log.json go (None: nowhere)
    progress: bool = True  # tqdm bar


@dataclass
class TrainResult:
    """What a run did: ``history`` has one dict per eval (step, loss, metric, lr, seconds)."""

    metric: float  # the last eval's metric
    best: float  # the best eval metric seen
    steps: int  # steps taken (fewer than asked when the target was reached)
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None


def lr_at(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up over ``warmup * steps`` steps to ``peak``, then cosine decay to 0 at ``steps``."""
    n_warm = max(1, int(warmup * steps))
    if step < n_warm:
        return peak * (step + 1) / n_warm
    progress = (step - n_warm) / max(1, steps - n_warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _check(config: TrainConfig) -> None:
    for name in ("steps", "batch_size", "eval_every", "eval_examples"):
        if getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be >= 1; got {name}={getattr(config, name)}")
    if not config.lr > 0:
        raise ValueError(f"`lr` must be > 0; got lr={config.lr}")
    if not 0.0 <= config.warmup < 1.0:
        raise ValueError(f"`warmup` must be a fraction in [0, 1); got warmup={config.warmup}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, task, batch) -> tuple[float, float]:
    """(loss, metric) of ``model`` on one batch of ``task``, in eval mode."""
    was_training = model.training
    model.eval()
    out = model(batch.inputs)
    loss, metric = task.loss(out, batch).item(), task.score(out, batch)
    model.train(was_training)
    return loss, metric


def aux_losses(model: torch.nn.Module) -> torch.Tensor | float:
    """Sum of the ``aux_loss`` tensors that modules set during the last forward (e.g. MoH's load-balance
    loss, already weighted by its coefficient); 0.0 when none has one."""
    return sum((m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)), 0.0)


def _reached(task, metric: float, target: float | None) -> bool:
    if target is None:
        return False
    return metric >= target if task.higher_is_better else metric <= target


def train(model: torch.nn.Module, task, config: TrainConfig | None = None) -> TrainResult:
    """Train ``model`` on ``task`` (a synthetic task: ``sample``, ``loss``, ``score``) and return the result.

    Seeds torch with ``config.seed`` (parameter init is the caller's: seed before building the
    model for a fully reproducible run).
    """
    config = config or TrainConfig()
    _check(config)
    device = torch.device(config.device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    held_out = task.sample(config.eval_examples, seed=EVAL_SEED - config.seed).to(device)
    history: list[dict[str, float]] = []
    start, best, step = time.perf_counter(), None, 0
    bar = tqdm(range(config.steps), disable=not config.progress, desc=type(task).__name__, leave=False)
    for step in bar:
        lr = lr_at(step, config.steps, config.lr, config.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = task.sample(config.batch_size, seed=config.seed * 1_000_003 + step).to(device)
        loss = task.loss(model(batch.inputs), batch)
        opt.zero_grad(set_to_none=True)
        (loss + aux_losses(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        last = step + 1 == config.steps
        if (step + 1) % config.eval_every == 0 or last:
            eval_loss, metric = evaluate(model, task, held_out)
            better = best is None or (metric > best if task.higher_is_better else metric < best)
            best = metric if better else best
            history.append(dict(step=step + 1, train_loss=loss.item(), eval_loss=eval_loss, metric=metric, lr=lr,
                                seconds=time.perf_counter() - start))
            bar.set_postfix(loss=f"{loss.item():.3f}", **{task.metric: f"{metric:.3f}"})
            if _reached(task, metric, config.target):
                break
    bar.close()
    result = TrainResult(metric=history[-1]["metric"], best=best, steps=history[-1]["step"],
                         seconds=time.perf_counter() - start, history=history)
    if config.out_dir is not None:
        result.checkpoint = save(model, task, config, result)
    return result


def save(model: torch.nn.Module, task, config: TrainConfig, result: TrainResult) -> str:
    """Write ``model.safetensors`` and ``log.json`` under ``config.out_dir``; return the checkpoint path."""
    os.makedirs(config.out_dir, exist_ok=True)
    path = os.path.join(config.out_dir, "model.safetensors")
    model_config = getattr(model, "config", {})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"model_config": json.dumps(model_config), "task": repr(task)})
    log = dict(task=repr(task), model=model_config, train=asdict(config), checkpoint=path,
               result={k: v for k, v in asdict(result).items() if k != "history"}, history=result.history)
    with open(os.path.join(config.out_dir, "log.json"), "w") as f:
        json.dump(log, f, indent=1)
    return path


def load_checkpoint(path: str, device: str = "cpu") -> TinyTransformer:
    """Rebuild the TinyTransformer saved by ``train`` at ``path`` (a model.safetensors file)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta: dict[str, Any] = f.metadata() or {}
    if "model_config" not in meta:
        raise ValueError(f"{path=} has no model_config metadata; was it written by attnlab.train?")
    model = TinyTransformer(**json.loads(meta["model_config"]))
    model.load_state_dict(load_file(path, device=device))
    return model.to(device)
