"""``fdp.pmap``: run one function per replica with named-axis collectives inside."""

from fdp._pmap._map import pmap

__all__ = ["pmap"]
