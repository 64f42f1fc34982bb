"""``fdp.nn``: layers for data parallelism: a functional, synchronized BatchNorm.

See ``docs/batchnorm.md``.
"""

from fdp.nn._convert import SyncBatchNorm, convert_sync_batchnorm
from fdp.nn._dropout import Dropout, dropout
from fdp.nn._keyed import convert_dropout, keyed_dropout
from fdp.nn._sync_batch_norm import BatchNormResult, sync_batch_norm

__all__ = [
    "BatchNormResult",
    "Dropout",
    "SyncBatchNorm",
    "convert_dropout",
    "convert_sync_batchnorm",
    "dropout",
    "keyed_dropout",
    "sync_batch_norm",
]
