"""fdp's named-axis collectives (``fdp.psum``, ``fdp.all_gather``, ``fdp.ppermute``, ...)."""

from fdp._collectives._exchange import all_to_all, ppermute, pshuffle, psum_scatter
from fdp._collectives._named import (
    AxisName,
    all_gather,
    axis_index,
    axis_names,
    axis_size,
    pmax,
    pmean,
    pmin,
    psum,
    row_mask,
    row_offset,
)

__all__ = [
    "AxisName",
    "all_gather",
    "all_to_all",
    "axis_index",
    "axis_names",
    "axis_size",
    "pmax",
    "pmean",
    "pmin",
    "ppermute",
    "pshuffle",
    "psum",
    "psum_scatter",
    "row_mask",
    "row_offset",
]
