"""The trainer: one function, ``train(config, workdir)``, from a laptop CPU to a multi-host pod.

State = float32 parameters, optax state and the step, sharded over a ``(data, fsdp, tensor)`` mesh by the
parameters' logical axes; one jitted step with explicit in/out shardings and the state donated. The step draws no
random numbers (no dropout) and the data is a pure function of the seed and the step, so restoring the state and
the step resumes a run exactly: the steps after a resume compute the same numbers as a run that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from twomamba_jax import nn, presets, sharding
from twomamba_jax.train.checkpoint import Checkpointer
from twomamba_jax.train.config import TrainConfig, to_dict
from twomamba_jax.train.data import Batch, Dataset, make_dataset
from twomamba_jax.train.metrics import MetricsLogger, train_flops_per_token
from twomamba_jax.train.optim import make_optimizer
from twomamba_jax.train.workdir import path as workdir_path

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(config: TrainConfig, vocab_size: int) -> nn.ModelConfig:
    """The ``nn.ModelConfig`` of a training config: size, mixer (with its overrides), precision, remat."""
    m = config.model
    if m.size not in presets.MODEL_SIZES:
        raise ValueError(f"model.size: expected one of {sorted(presets.MODEL_SIZES)}; got {m.size!r}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}; got {config.precision!r}")
    overrides = {key: value for key, value in (("chunk_size", m.chunk_size), ("impl", m.impl)) if value is not None}
    sizes = dict(presets.MODEL_SIZES[m.size])
    sizes.update({key: getattr(m, key) for key in sizes if getattr(m, key) is not None})
    return nn.ModelConfig(vocab_size=vocab_size, mixer=presets.mixer_config(m.mixer, **overrides),
                          dtype=PRECISIONS[config.precision], remat=m.remat,
                          remat_policy=m.remat_policy, **sizes)


def _init_distributed(mesh_config) -> None:
    if mesh_config.num_processes > 1 and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=mesh_config.coordinator_address or None,
                                   num_processes=mesh_config.num_processes,
                                   process_id=None if mesh_config.process_id < 0 else mesh_config.process_id)


def masked_sums(logits, batch):
    """(sum of the masked token losses, mask count, masked exact matches)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]) * mask
    return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct)


@dataclasses.dataclass
class Setup:
    """What a run is made of, before any step: usable to build, restore or test a run piece by piece."""

    config: TrainConfig
    dataset: Dataset
    model_config: nn.ModelConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state_shardings: dict
    abstract_state: dict
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    batch_sharding: NamedSharding
    num_params: int

    def flops_per_token(self) -> float:
        """The trainer's FLOPs per trained token (``metrics.train_flops_per_token``: the matmul parameters, all
        but the embedding table, and the causal mixer core at ``data.seq_len``), for MFU."""
        m = self.model_config
        return train_flops_per_token(self.num_params - m.vocab_size * m.model_dim, m.num_layers, m.num_heads,
                                     m.head_dim, self.config.data.seq_len)

    def init_state(self) -> dict:
        """Fresh parameters (from ``config.seed``; the same values on every mesh) and optimizer state."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._fresh_state, out_shardings=self.state_shardings)()

    def _fresh_state(self):
        model = nn.LanguageModel(self.model_config, rngs=nnx.Rngs(self.config.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def global_batch(self, local: Batch) -> dict:
        """This process's rows -> global arrays sharded over the data axes."""
        rows = self.config.data.batch_size
        return {key: jax.make_array_from_process_local_data(self.batch_sharding, value, (rows, *value.shape[1:]))
                for key, value in local.items()}

    def train_step(self):
        """The jitted step: (state, batch) -> (state, metrics); the state is donated."""
        accumulate = self.config.optim.accumulate
        graphdef, optimizer, schedule = self.graphdef, self.optimizer, self.schedule

        masked = masks_documents(self.dataset, self.config.data)

        def loss_sum(params, batch):
            loss, count, correct = masked_sums(model_logits(nnx.merge(graphdef, params), batch, masked), batch)
            return loss, (count, correct)

        def step(state, batch):
            # Micro-batch j is rows j, j + A, j + 2A, ...: each is spread over all data shards.
            micro = jax.tree.map(lambda x: x.reshape(-1, accumulate, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate_grads(carry, micro_batch):
                (loss, (count, correct)), grads = jax.value_and_grad(loss_sum, has_aux=True)(
                    state["params"], micro_batch)
                sums = (carry[0] + loss, carry[1] + count, carry[2] + correct)
                return (*sums, jax.tree.map(jnp.add, carry[3], grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            zero = jnp.zeros((), jnp.float32)
            (loss, count, correct, grads), _ = jax.lax.scan(accumulate_grads, (zero, zero, zero, zeros), micro)
            count = jnp.maximum(count, 1.0)
            grads = jax.tree.map(lambda g: g / count, grads)  # the mean over every masked token of the batch
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                         "step": state["step"] + 1}
            metrics = {"loss": loss / count, "accuracy": correct / count, "grad_norm": optax.tree.norm(grads),
                       "learning_rate": schedule(state["step"])}
            return new_state, metrics

        replicated = NamedSharding(self.mesh, P())
        batch_shardings = {key: self.batch_sharding for key in ("inputs", "targets", "loss_mask", "segment_ids")}
        return jax.jit(step, in_shardings=(self.state_shardings, batch_shardings),
                       out_shardings=(self.state_shardings, replicated), donate_argnums=0)

    def eval_step(self):
        """The jitted eval: (params, batch) -> (loss sum, count, exact matches)."""
        graphdef, masked = self.graphdef, masks_documents(self.dataset, self.config.data)
        return jax.jit(lambda params, batch: masked_sums(model_logits(nnx.merge(graphdef, params), batch, masked),
                                                         batch))


def masks_documents(dataset: Dataset, data_config) -> bool:
    """Whether the model sees each document of a row alone (given the rows' ``segment_ids``): for packed text,
    unless ``data.cross_document``; synthetic rows are one sequence each."""
    return dataset.packs_documents and not data_config.cross_document


def model_logits(model: nn.LanguageModel, batch: dict, masked: bool) -> jax.Array:
    """The logits of a batch; ``masked``: each document of a row seen alone (the rows' ``segment_ids``)."""
    return model(batch["inputs"], segment_ids=batch["segment_ids"] if masked else None)


def setup(config: TrainConfig, devices=None) -> Setup:
    """Data, model config, mesh (over ``devices``, default all), shardings and optimizer of a run; fails here,
    before compiling, on bad meshes."""
    for name, value in (("steps", config.steps), ("log_every", config.log_every)):
        if value <= 0:
            raise ValueError(f"{name}: expected a positive int; got {value}")
    if config.eval.every < 0 or (config.eval.every and config.eval.batches <= 0):
        raise ValueError(f"eval: expected every >= 0 (0 turns eval off) and, with eval on, batches >= 1; got "
                         f"every={config.eval.every}, batches={config.eval.batches}")
    _init_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    share_index, share_count = sharding.process_batch_share(mesh)
    dataset = make_dataset(config.data, share_index=share_index, share_count=share_count)
    model_cfg = model_config(config, dataset.vocab_size)
    optimizer, schedule = make_optimizer(config.optim, config.steps)
    accumulate = config.optim.accumulate
    if config.data.batch_size % accumulate:
        raise ValueError(f"optim.accumulate: {accumulate} does not divide data.batch_size={config.data.batch_size}")
    abstract_model = nnx.eval_shape(lambda: nn.LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
    mixer = abstract_model.blocks[0].mixer
    sharding.check_mesh_fits(mesh, num_heads=mixer.num_heads, num_kv_heads=getattr(mixer, "num_kv_heads", None),
                             batch_size=config.data.batch_size // accumulate)
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    param_shardings = nnx.to_pure_dict(sharding.param_shardings(abstract_params, mesh))
    abstract_params = nnx.to_pure_dict(abstract_params)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
    abstract_state = {"params": abstract_params, "opt_state": abstract_opt,
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
    return Setup(config, dataset, model_cfg, mesh, graphdef, state_shardings, abstract_state, optimizer, schedule,
                 sharding.batch_sharding(mesh), num_params)


def _any_process(flag: bool) -> bool:
    """Whether any process has the flag: all must stop (and save, a collective) at the same step."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the end of the current step and returns."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = True
        print(f"signal {signal.Signals(signum).name}: stopping after this step (a checkpoint is saved)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def eval_totals(eval_step, params, batches) -> tuple[float, int, float]:
    """(mean loss, masked token count, exact-match rate) of ``eval_step`` (``masked_sums`` under jit) over
    ``batches``."""
    loss = count = correct = 0.0
    for batch in batches:
        sums = jax.device_get(eval_step(params, batch))
        loss, count, correct = loss + float(sums[0]), count + float(sums[1]), correct + float(sums[2])
    count = max(count, 1.0)
    return loss / count, int(count), correct / count


def evaluate(run: Setup, eval_step, params, batches) -> dict:
    loss, _, accuracy = eval_totals(eval_step, params, (run.global_batch(local) for local in batches))
    metrics = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
    if run.dataset.has_accuracy:
        metrics["accuracy"] = accuracy
    return metrics


# The settings that decide which rows a step reads: a resumed run must keep them, or it would not continue the
# stream it stopped in (the batch size is checked against the checkpoint itself).
DATA_STREAM_KEYS = ("source", "seq_len", "seed", "tokenizer", "vocab_size", "num_kv_pairs", "eval_fraction",
                    "niah_fraction")


def check_same_data(previous: dict, config: TrainConfig, step: int) -> None:
    """Refuses to resume a run at ``step`` whose config.json (``previous``) read other data than ``config``."""
    written = previous.get("data", {})
    for key in DATA_STREAM_KEYS:
        now = getattr(config.data, key)
        before = written.get(key, now)  # a key the run's version did not write cannot have changed
        if before != now:
            raise ValueError(f"data.{key}: the checkpoint at step {step} was trained with {before!r} (config.json); "
                             f"got {now!r}. Resuming would not continue the same data: use a new --workdir, or "
                             f"--config.allow_data_change=true to resume with the new data")


def train(config: TrainConfig, workdir: str | os.PathLike, *, stop_after: int | None = None, stream=sys.stdout) -> dict:
    """Trains (or resumes, from the latest checkpoint in ``workdir``) to ``config.steps``; returns the summary.

    stop_after: stop (with a checkpoint) once this step is done, as if stopped by SIGTERM; for tests and
    time-boxed jobs.
    """
    workdir = workdir_path(workdir)
    run = setup(config)
    is_main = jax.process_index() == 0
    config_file = workdir / "config.json"
    previous = json.loads(config_file.read_text()) if config_file.is_file() else None
    checkpointer = Checkpointer(workdir / "checkpoints", config.checkpoint)
    batches = run.dataset.train_iterator()
    restored = checkpointer.restore_latest(run.abstract_state, run.state_shardings, config.data.batch_size, batches)
    if restored is not None and previous is not None and not config.allow_data_change:
        check_same_data(previous, config, int(jax.device_get(restored["step"])))
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps(to_dict(config), indent=2) + "\n")
    state = restored if restored is not None else run.init_state()
    start = int(jax.device_get(state["step"]))
    tokens_per_step = config.data.batch_size * config.data.seq_len
    logger = MetricsLogger(workdir, total_steps=config.steps, start_step=start, tokens_per_step=tokens_per_step,
                           flops_per_token=run.flops_per_token(), dtype=config.precision, enabled=is_main,
                           stream=stream)
    logger.message(f"{'resuming at' if restored is not None else 'starting'} step {start}/{config.steps}: "
                   f"{config.model.size} {config.model.mixer}, {run.num_params / 1e6:.2f}M parameters, "
                   f"{config.data.source}, mesh {dict(run.mesh.shape)}, {jax.device_count()} "
                   f"{jax.devices()[0].platform} device(s)")
    eval_step = run.eval_step()
    eval_batches = run.dataset.eval_batches(config.eval.batches) if config.eval.every else []
    pending, last, last_eval, compile_seconds = [], {}, None, 0.0
    step = start
    with jax.set_mesh(run.mesh), _StopRequest() as stop:
        upcoming = run.global_batch(next(batches)) if step < config.steps else None
        if upcoming is not None:  # compiled before the clock starts: throughput counts training only
            compiling = time.perf_counter()
            train_step = run.train_step().lower(state, upcoming).compile()
            compile_seconds = time.perf_counter() - compiling
            logger.message(f"compiled the train step in {compile_seconds:.1f}s")
        started = time.perf_counter()
        logger.start_clock(step)
        while step < config.steps:
            batch = upcoming if upcoming is not None else run.global_batch(next(batches))
            upcoming = None
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            step += 1
            done = step == config.steps
            stopping = _any_process(stop.requested) or step == stop_after
            if step % config.log_every == 0 or done or stopping:
                averaged = {k: float(np.mean([jax.device_get(p[k]) for p in pending])) for k in pending[0]}
                if not run.dataset.has_accuracy:
                    averaged.pop("accuracy")
                last = logger.progress(step, averaged)
                pending = []
            if eval_batches and (step % config.eval.every == 0 or done):
                with logger.excluded(state):
                    last_eval = (step, evaluate(run, eval_step, state["params"], eval_batches))
                logger.write(step, "eval", last_eval[1])
                logger.message(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval[1].items()))
            if step % config.checkpoint.every == 0 or done or stopping:
                with logger.excluded(state):
                    checkpointer.save(step, state, config.data.batch_size, batches)
            if stopping and not done:
                logger.message(f"stopped at step {step}; rerun the same command to resume")
                break
        elapsed = time.perf_counter() - started
        train_seconds = elapsed - logger.excluded_seconds
        rate = (step - start) * tokens_per_step / max(train_seconds, 1e-9)
        summary = {"step": step, "steps": config.steps, "seconds": elapsed + compile_seconds, "train": last,
                   "compile_seconds": compile_seconds, "train_seconds": train_seconds, "tokens_per_second": rate,
                   "mfu": logger.mfu(rate), "num_params": run.num_params}
        if eval_batches:  # inside the mesh: the mixer cores must see it
            fresh = last_eval is not None and last_eval[0] == step
            summary["eval"] = last_eval[1] if fresh else evaluate(run, eval_step, state["params"], eval_batches)
    checkpointer.close()
    batches.close()
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.message(f"done: step {step}/{config.steps} in {elapsed:.0f}s"
                       + ("".join(f", eval {k} {v:.4f}" for k, v in summary.get("eval", {}).items())))
    logger.close()
    return summary
