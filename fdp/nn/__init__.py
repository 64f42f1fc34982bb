"""``fdp.nn``: layers for data parallelism: a functional, synchronized BatchNorm.

See ``docs/batchnorm.md``.
"""

from fdp.nn._convert import SyncBatchNorm, convert_sync_batchnorm
from fdp.nn._sync_batch_norm import BatchNormResult, sync_batch_norm

__all__ = ["BatchNormResult", "SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm"]
