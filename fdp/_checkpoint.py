"""Checkpoints of pytrees (a ``TrainState``): atomic writes, loads that never execute code."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fdp import _tree

__all__ = ["load_checkpoint", "save_checkpoint"]

FORMAT = "fdp-checkpoint-1"
FILENAME = "state.pt"


def save_checkpoint(directory: str | os.PathLike, state: Any) -> Path:
    """Writes ``state`` (a pytree of tensors and plain values) to ``directory/state.pt``.

    The file is written to a temporary name in the same directory and then renamed over the
    old one, so an interrupted save leaves the previous checkpoint intact. The payload holds
    only tensors, strings and numbers, keyed by key path, plus a SHA-256 digest of the tensor
    bytes; :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``.

    Returns:
        The path of the checkpoint file.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> path = fdp.save_checkpoint(d, {"w": torch.ones(2)})
        >>> fdp.load_checkpoint(d, like={"w": torch.zeros(2)})
        {'w': tensor([1., 1.])}
    """
    directory = _directory(directory, "save_checkpoint")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_checkpoint: directory={str(directory)!r} is a file, not a "
                         f"directory; checkpoints are written to directory/{FILENAME}")
    pairs = _tree.leaves_with_path(state, "state")
    for path, leaf in pairs:
        if not isinstance(leaf, (torch.Tensor, int, float, str, bool, type(None))):
            raise TypeError(f"save_checkpoint: {path} is a {type(leaf).__name__}; checkpoints "
                            f"hold tensors, numbers, strings and None")
    directory.mkdir(parents=True, exist_ok=True)  # only for a state it can write
    leaves = [_own_storage(leaf.detach().cpu()) if isinstance(leaf, torch.Tensor) else leaf
              for _, leaf in pairs]
    payload = {"format": FORMAT, "paths": [p for p, _ in pairs], "leaves": leaves,
               "sha256": _digest(leaves)}
    final = directory / FILENAME
    for stale in directory.glob(f".{FILENAME}.*.tmp"):  # left by a process that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{FILENAME}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    return final


def load_checkpoint(directory: str | os.PathLike, like: Any) -> Any:
    """Reads the checkpoint in ``directory`` into the structure of ``like``.

    ``like`` (e.g. a freshly created state) fixes the tree structure, dtypes, shapes and
    devices; the checkpoint must have exactly the same key paths, dtypes and shapes.

    Raises:
        FileNotFoundError: no checkpoint in ``directory``.
        ValueError: the file is corrupt or truncated, or its structure differs from ``like``
            (the message names the first differing key path).
    """
    path = _directory(directory, "load_checkpoint") / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}")
    payload = _read(path)
    want = _tree.leaves_with_path(like, "state")
    _check_structure(path, payload["paths"], payload["leaves"], want)
    leaves = [stored.to(ref.device) if isinstance(ref, torch.Tensor) else stored
              for stored, (_, ref) in zip(payload["leaves"], want, strict=True)]
    return _tree.unflatten(leaves, _tree.flatten(like)[1])


def _directory(directory: Any, fn: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{fn}: directory must be a str or os.PathLike (the checkpoint's "
                        f"folder), got {type(directory).__name__}")
    return Path(directory)


def _read(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"load_checkpoint: {path} is corrupt or truncated, or holds more than "
                         f"tensors and plain values ({reason}); restore an earlier checkpoint"
                         ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"load_checkpoint: {path} is not an fdp checkpoint ({FORMAT})")
    paths, leaves = payload.get("paths"), payload.get("leaves")
    if not (isinstance(paths, list) and isinstance(leaves, list) and len(paths) == len(leaves)
            and all(isinstance(p, str) for p in paths) and len(set(paths)) == len(paths)):
        raise ValueError(f"load_checkpoint: {path} is corrupt: its table of entries is damaged; "
                         f"restore an earlier checkpoint")
    if payload.get("sha256") != _digest(payload["leaves"]):
        raise ValueError(f"load_checkpoint: {path} is corrupt: its tensor data does not match "
                         f"the digest written with it; restore an earlier checkpoint")
    return payload


def _check_structure(path: Path, paths: list, leaves: list, want: list) -> None:
    have = dict(zip(paths, leaves, strict=True))
    for key, ref in want:
        if key not in have:
            raise ValueError(f"load_checkpoint: {path} has no {key}; it was saved from a "
                             f"different structure")
        stored = have[key]
        tensors = isinstance(ref, torch.Tensor) and isinstance(stored, torch.Tensor)
        if (tensors and (ref.shape != stored.shape or ref.dtype != stored.dtype)) or (
            not tensors and type(ref) is not type(stored)
        ):
            raise ValueError(f"load_checkpoint: {key} in {path} is {_describe(stored)}, "
                             f"expected {_describe(ref)}")
    extra = sorted(set(paths) - {k for k, _ in want})
    if extra:
        raise ValueError(f"load_checkpoint: {path} has entries that the target lacks: "
                         f"{extra[:3]}; it was saved from a different structure")
    order = [k for k, _ in want]
    if paths != order:  # same entries, other order (e.g. dict insertion order)
        leaves[:] = [have[k] for k in order]
        paths[:] = order


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A view would save its whole base tensor (and come back sharing it): copy it out."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        return t.clone()
    return t


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable (POSIX); a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype}{list(x.shape)}"
    return type(x).__name__


def _digest(leaves: list) -> str:
    h = hashlib.sha256()
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            data = leaf.contiguous().reshape(-1).view(torch.uint8) if leaf.numel() else leaf
            h.update(str((leaf.dtype, tuple(leaf.shape))).encode())
            h.update(data.numpy().tobytes() if leaf.numel() else b"")
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()
