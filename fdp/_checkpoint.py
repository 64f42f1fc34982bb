"""Checkpoints of pytrees (a ``TrainState``): atomic writes, loads that never execute code."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from fdp import _tree
from fdp._donation import check_not_donated
from fdp._mesh import Mesh, check_mesh
from fdp._zero import ShardedOptState

__all__ = ["load_checkpoint", "save_checkpoint"]

T = TypeVar("T")

FORMAT = "fdp-checkpoint-1"
FILENAME = "state.pt"


def save_checkpoint(path: str | os.PathLike, state: Any, *, mesh: Mesh | None = None) -> Path:
    """Writes ``state`` (a pytree of tensors and plain values) to a checkpoint file.

    ``path`` is a folder (the file is ``path/state.pt``) or a file: an existing file, or a
    name ending in ``.pt``/``.pth`` that is not an existing folder. The file is written to a
    temporary name in the same folder and then renamed over the old one, so an interrupted
    save leaves the previous checkpoint intact, and concurrent saves into one folder (threads
    or processes) each complete: the file then holds one of the states whole, the one renamed
    last. The payload holds only tensors, strings and numbers, keyed by key path, plus a
    SHA-256 digest of the tensor bytes; :func:`load_checkpoint` reads it with
    ``torch.load(weights_only=True)``.

    Args:
        path: the checkpoint folder or file.
        state: the pytree to save (e.g. a :class:`fdp.TrainState`).
        mesh: on a mesh whose replicas live in several processes (``fdp.Mesh.distributed()``),
            pass it from every process: the state is replicated, so process 0 writes and the
            others wait until the file is in place (every process raises if the write
            failed). Without ``mesh``, every process that calls this writes. A state whose
            optimizer state is sharded over such a mesh (``shard_optimizer_state=True``) is
            not replicated: every process writes its own file, ``state.rank{r}-of-{n}.pt``
            in the folder (``name.rank{r}-of-{n}.pt`` for a file ``name.pt``), with its
            slices of the optimizer state, and every process raises if any write failed.

    Returns:
        The path of the checkpoint file.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> path = fdp.save_checkpoint(d, {"w": torch.ones(2)})
        >>> fdp.load_checkpoint(d, like={"w": torch.zeros(2)})
        {'w': tensor([1., 1.])}
    """
    if mesh is not None:
        check_mesh(mesh, "save_checkpoint")
    final, pairs = _together(mesh, "checking the arguments", lambda: _checked(path, state))
    if _split_over_processes(state, mesh, "save_checkpoint"):
        assert mesh is not None
        final = _rank_file(final, mesh)
        _together(mesh, f"writing the shard files (this one: {final.name})",
                  lambda: _write(final, pairs))
        return final
    if mesh is None or mesh.backend.process_index == 0:
        _together(mesh, "writing the file in process 0", lambda: _write(final, pairs))
    else:
        _together(mesh, "writing the file in process 0", lambda: None)
    return final


def _together(mesh: Mesh | None, what: str, task: Callable[[], T]) -> T:
    """Runs ``task`` here; on a mesh of several processes, every process then raises if it
    failed in any of them (so that none waits for a process that gave up)."""
    try:
        result = task()
    except BaseException:
        if mesh is not None:
            mesh.backend.agree(False, "save_checkpoint")
        raise
    if mesh is not None and not mesh.backend.agree(True, "save_checkpoint"):
        raise RuntimeError(f"save_checkpoint: {what} failed in another process of the mesh "
                           f"(its error is in that process's log); the previous checkpoint is "
                           f"intact")
    return result


def _checked(path: object, state: Any) -> tuple[Path, list[tuple[str, Any]]]:
    final = _target(path, "save_checkpoint")
    pairs = _tree.leaves_with_path(state, "state")
    check_not_donated(state, "save_checkpoint", "state")
    for key, leaf in pairs:
        if not isinstance(leaf, (torch.Tensor, int, float, str, bool, type(None))):
            raise TypeError(f"save_checkpoint: {key} is a {type(leaf).__name__}; "
                            f"checkpoints hold tensors, numbers, strings and None")
    return final, pairs


def _write(final: Path, pairs: list[tuple[str, Any]]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    leaves = [_own_storage(leaf.detach().cpu()) if isinstance(leaf, torch.Tensor) else leaf
              for _, leaf in pairs]
    payload = {"format": FORMAT, "paths": [p for p, _ in pairs], "leaves": leaves,
               "sha256": _digest(leaves)}
    _remove_stale_temps(final)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent)
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
    _fsync_directory(final.parent)


def load_checkpoint(path: str | os.PathLike, like: Any, *, mesh: Mesh | None = None) -> Any:
    """Reads the checkpoint at ``path`` (a folder or file, as :func:`save_checkpoint` takes)
    into the structure of ``like``.

    For a state whose optimizer state is sharded over a mesh of several processes, pass that
    ``mesh`` too: each process reads its own ``state.rank{r}-of-{n}.pt``, which must come from
    a mesh with the same number of processes.

    ``like`` (e.g. a freshly created state) fixes the tree structure, dtypes, shapes and
    devices; the checkpoint must have exactly the same key paths, dtypes and shapes. A leaf
    of ``like`` on the ``meta`` device (a structure without values) loads onto the CPU.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the file is corrupt or truncated, or its structure differs from ``like``
            (the message names the first differing key path).
    """
    if mesh is not None:
        check_mesh(mesh, "load_checkpoint")
    file = _target(path, "load_checkpoint")
    if _split_over_processes(like, mesh, "load_checkpoint"):
        assert mesh is not None
        file = _rank_file(file, mesh)
        if not file.is_file():
            others = sorted(p.name for p in file.parent.glob(f"{file.stem}.rank*-of-*"))
            raise FileNotFoundError(
                f"load_checkpoint: no shard file {file}"
                + (f"; the folder holds {others[:3]}, saved from another number of processes "
                   f"(a sharded optimizer state loads into the same number)" if others else ""))
    if not file.is_file():
        shards = sorted(p.name for p in file.parent.glob(f"{file.stem}.rank*-of-*{file.suffix}"))
        if shards:
            raise FileNotFoundError(f"load_checkpoint: no checkpoint at {file}, but shard files "
                                    f"of a sharded optimizer state ({shards[0]}, ...); pass "
                                    f"mesh= (the distributed mesh) and a like= built with "
                                    f"shard_optimizer_state=True")
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {file}")
    payload = _read(file)
    want = _tree.leaves_with_path(like, "state")
    _check_structure(file, payload["paths"], payload["leaves"], want)
    leaves = [stored.to(_load_device(ref)) if isinstance(ref, torch.Tensor) else stored
              for stored, (_, ref) in zip(payload["leaves"], want, strict=True)]
    return _tree.unflatten(leaves, _tree.flatten(like)[1])


def _split_over_processes(state: Any, mesh: Mesh | None, fn: str) -> bool:
    """Whether ``state``'s optimizer state is sharded and this process holds only its slices
    (so that each process has its own file)."""
    opt_state = getattr(state, "opt_state", None)
    if not isinstance(opt_state, ShardedOptState):
        return False
    held = {x.shape[0] for x in _tree.flatten(opt_state.slices)[0]
            if isinstance(x, torch.Tensor) and x.dim() > 0}
    if mesh is None:
        if held and held != {opt_state.mesh_size}:
            raise ValueError(f"{fn}: state.opt_state is sharded and this process holds only "
                             f"its own slices; pass mesh= (the distributed mesh) from every "
                             f"process, so that each process has its own file")
        return False
    if opt_state.mesh_size != mesh.size:
        raise ValueError(f"{fn}: state.opt_state is split over {opt_state.mesh_size} replicas "
                         f"but the mesh has {mesh.size}; pass the mesh the state was made for")
    return mesh.backend.local_size < mesh.size


def _rank_file(final: Path, mesh: Mesh) -> Path:
    processes = mesh.size // mesh.backend.local_size
    return final.with_name(f"{final.stem}.rank{mesh.backend.process_index}-of-{processes}"
                           f"{final.suffix}")


def _load_device(ref: torch.Tensor) -> torch.device:
    return torch.device("cpu") if ref.device.type == "meta" else ref.device


def _target(path: object, fn: str) -> Path:
    """The checkpoint file ``path`` names: ``path/state.pt`` for a folder, else ``path``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike (a folder or a .pt file), "
                        f"got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        return p / FILENAME
    if p.exists() and not p.is_file():
        raise ValueError(f"{fn}: {p} is neither a folder nor a file; pass a folder (the "
                         f"checkpoint is its {FILENAME}) or a .pt file")
    if p.is_file() and fn == "save_checkpoint" and p.suffix not in (".pt", ".pth"):
        raise ValueError(f"{fn}: path={str(p)!r} is an existing file that is not a .pt "
                         f"checkpoint; pass a folder (the checkpoint is its {FILENAME}) or a "
                         f"path ending in .pt")
    if p.is_file() or p.suffix in (".pt", ".pth"):
        if p.parent.exists() and not p.parent.is_dir():
            raise ValueError(f"{fn}: {p.parent} is a file, not a folder")
        return p
    return p / FILENAME


def _temp_prefix(final: Path) -> str:
    """Temporary files name their host and process, so a save removes only those that a
    dead process on this host left (never another live save's)."""
    return f".{final.name}.{_host()}.{os.getpid()}."


def _remove_stale_temps(final: Path) -> None:
    for temp in final.parent.glob(f".{final.name}.*.tmp"):
        parts = temp.name[len(final.name) + 2:].split(".")
        if len(parts) >= 3 and parts[0] == _host() and parts[1].isdigit() \
                and not _alive(int(parts[1])):
            temp.unlink(missing_ok=True)


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
