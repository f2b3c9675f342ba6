"""What a rematerialized block may keep for its backward instead of computing it again.

The attention kernels' forwards (the chunked and flash-style Pallas kernels, cuDNN's fused attention) are the costly
part of recomputing a block, and what their backwards read is small: the output and a few numbers a token (the
normalizer or softmax statistics; the final states). The Pallas kernels name those values ``ATTENTION_RESIDUALS``
(``named_forward``); ``save_attention`` is the ``jax.checkpoint`` policy that keeps them and cuDNN's forward
outputs, so a block's backward recomputes its projections, norms and MLP but no attention kernel's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

ATTENTION_RESIDUALS = "attention_residuals"
# The primitive of cuDNN's fused attention forward (``jax.nn.dot_product_attention`` on GPUs): its outputs are the
# attention output and the softmax statistics, what its backward reads.
CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def named_forward(forward: Callable, *args, static_argnums: tuple[int, ...]):
    """``forward(*args)`` (an attention kernel's forward, in a custom_vjp's fwd rule) with every output named
    ``ATTENTION_RESIDUALS``. It runs as a jit call: a pallas_call stays in a jaxpr whose uses of it are gone (its
    DCE rule keeps every kernel), a jit call without effects does not, so where a remat policy keeps these outputs
    the backward runs none of the kernels again."""
    outputs = jax.jit(forward, static_argnums=static_argnums)(*args)
    return jax.tree.map(lambda x: checkpoint_name(x, ATTENTION_RESIDUALS), outputs)


def _cudnn_attention_forward(primitive, *_, **__) -> bool:
    return primitive.name == CUDNN_ATTENTION_FORWARD


save_attention = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS), _cudnn_attention_forward)
save_attention.__doc__ = "``jax.checkpoint`` policy: keep the attention kernels' outputs and residuals."
