"""optax AdamW with warmup then cosine / linear / constant decay, a weight-decay mask and optional clipping."""

from __future__ import annotations

import math

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
DECAY_MASKS = ("matrices", "all")


def make_schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then the decay to ``final_lr_ratio``."""
    # NaN, inf, 0 or a negative rate would train on without a word: NaNs, ascent or no change at all.
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise ValueError(f"optim.learning_rate: expected a positive finite number; got {config.learning_rate}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: expected one of {SCHEDULES}; got {config.schedule!r}")
    if not 0 <= config.warmup_steps <= total_steps:
        raise ValueError(f"optim.warmup_steps: expected 0 to steps={total_steps}; got {config.warmup_steps}")
    peak, final = config.learning_rate, config.learning_rate * config.final_lr_ratio
    decay_steps = max(total_steps - config.warmup_steps, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.final_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, final, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def _decay_mask(kind: str):
    if kind not in DECAY_MASKS:
        raise ValueError(f"optim.decay_mask: expected one of {DECAY_MASKS}; got {kind!r}")
    if kind == "all":
        return None
    return lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms, biases, A_log, D


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(the optimizer, its learning-rate schedule)."""
    if config.accumulate < 1:
        raise ValueError(f"optim.accumulate: expected a positive int; got {config.accumulate}")
    if config.grad_clip < 0:
        raise ValueError(f"optim.grad_clip: expected >= 0 (0 turns clipping off); got {config.grad_clip}")
    schedule = make_schedule(config, total_steps)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                        mask=_decay_mask(config.decay_mask))
    if config.grad_clip:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw), schedule
    return adamw, schedule
