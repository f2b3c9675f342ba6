"""The embedded default: the tiny 2Mamba model on synthetic multi-query associative recall (MQAR), offline.

Finishes in about 2.5 minutes on 2 CPU cores and learns the task (exact-match recall near 1; chance is 1/128).
"""

from twomamba_jax.train.config import (CheckpointConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                                       TrainConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        steps=600,
        log_every=25,
        model=ModelConfig(size="tiny", mixer="2mamba"),
        data=DataConfig(source="mqar", seq_len=128, batch_size=32, vocab_size=256, num_kv_pairs=16),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=50, schedule="cosine", weight_decay=0.1),
        checkpoint=CheckpointConfig(every=200, keep=2),
        eval=EvalConfig(every=100, batches=4),
    )
