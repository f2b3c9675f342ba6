"""The paper's small model (~276M parameters with a 32k vocabulary; SPEC section 4), its training recipe:
AdamW (0.9, 0.999), lr 1e-4, weight decay 0.01, 10k warmup then linear decay, 32 x 2048 tokens, bf16 compute,
no clipping, 100k steps. Data: C4 through TFDS (``--config.data.source=...`` to change; a SentencePiece model via
``--config.data.tokenizer=PATH``)."""

from twomamba_jax.train.config import (CheckpointConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                                       TrainConfig)


def get_config(size: str = "small") -> TrainConfig:
    return TrainConfig(
        steps=100_000,
        precision="bfloat16",
        log_every=50,
        model=ModelConfig(size=size, mixer="2mamba"),
        data=DataConfig(source="tfds:c4/en", seq_len=2048, batch_size=32, eval_split="validation"),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=10_000, schedule="linear", final_lr_ratio=0.0,
                          weight_decay=0.01, b1=0.9, b2=0.999, grad_clip=0.0),
        checkpoint=CheckpointConfig(every=2000, keep=3),
        eval=EvalConfig(every=2000, batches=16),
    )
