"""The paper's medium model (~735M parameters; SPEC section 4), with the small model's recipe."""

from twomamba_jax.configs import small
from twomamba_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
    return small.get_config(size="medium")
