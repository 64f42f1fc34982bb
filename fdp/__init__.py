"""fdp: functional data parallelism for PyTorch.

Pure functions, explicit state, named-axis collectives, and proofs of equivalence with
single-device training. See ``docs/index.md``.
"""

from fdp import interop, nn, optim, random, testing, tree
from fdp._accumulate import accumulate
from fdp._checkpoint import load_checkpoint, save_checkpoint
from fdp._collectives import (
    all_gather,
    all_to_all,
    axis_index,
    axis_size,
    pmax,
    pmean,
    pmin,
    ppermute,
    pshuffle,
    psum,
    psum_scatter,
)
from fdp._data_parallel import DataParallel
from fdp._functionalize import Model, functionalize
from fdp._grad import SplitLoss, split_loss, value_and_grad
from fdp._layout import Layout, Sharded
from fdp._mesh import Mesh
from fdp._pmap import pmap
from fdp._primitives import all_reduce, gather, replicate, scatter, unreplicate
from fdp._train import TrainState, data_parallel_step
from fdp._version import __version__ as __version__
from fdp._zero import ShardedOptState
from fdp.backends._fallback import FallbackWarning

__all__ = [
    "DataParallel",
    "FallbackWarning",
    "Layout",
    "Mesh",
    "Model",
    "Sharded",
    "ShardedOptState",
    "SplitLoss",
    "TrainState",
    "accumulate",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "axis_index",
    "axis_size",
    "data_parallel_step",
    "functionalize",
    "gather",
    "interop",
    "load_checkpoint",
    "nn",
    "optim",
    "pmap",
    "pmax",
    "pmean",
    "pmin",
    "ppermute",
    "pshuffle",
    "psum",
    "psum_scatter",
    "random",
    "replicate",
    "save_checkpoint",
    "scatter",
    "split_loss",
    "testing",
    "tree",
    "unreplicate",
    "value_and_grad",
]
