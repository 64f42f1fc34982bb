"""Pure, optax-style optimizers over pytrees of tensors.

An optimizer is a :class:`GradientTransformation`: ``state = opt.init(params)`` and
``updates, state = opt.update(grads, state, params)``, then ``params = apply_updates(params,
updates)``. States are NamedTuples of tensors; ``update`` and ``apply_updates`` never write into
their inputs, so the same code runs eagerly, inside :func:`fdp.pmap` / ``torch.func.vmap`` and
under ``torch.compile``. (Inside ``fdp.data_parallel_step(..., donate=...)`` fdp's own
transformations write into memory the step owns, with the same kernels and bitwise the same
results; see docs/training.md.) Each optimizer matches its ``torch.optim`` counterpart
numerically.

Example:
    >>> opt = fdp.optim.chain(fdp.optim.clip_by_global_norm(1.0),
    ...                       fdp.optim.adamw(fdp.optim.cosine_decay_schedule(1e-3, 100)))
    >>> params = {"w": torch.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.ones(3)}, state, params)
    >>> params = fdp.optim.apply_updates(params, updates)
    >>> state[1].count
    tensor(1)
"""

from fdp.optim._adam import AdamState, adam, adamw
from fdp.optim._base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    chain,
    sum_over_shards,
)
from fdp.optim._clip import clip_by_global_norm, global_norm
from fdp.optim._rmsprop import RMSPropState, rmsprop
from fdp.optim._schedules import (
    Schedule,
    constant_schedule,
    cosine_decay_schedule,
    linear_schedule,
    linear_warmup_schedule,
    step_schedule,
    warmup_cosine_decay_schedule,
)
from fdp.optim._sgd import SGDState, sgd

__all__ = [
    "AdamState",
    "EmptyState",
    "GradientTransformation",
    "RMSPropState",
    "SGDState",
    "Schedule",
    "adam",
    "adamw",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "global_norm",
    "linear_schedule",
    "linear_warmup_schedule",
    "rmsprop",
    "sgd",
    "step_schedule",
    "sum_over_shards",
    "warmup_cosine_decay_schedule",
]
