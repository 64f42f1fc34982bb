"""Names the layer (or buffer, or loss) that makes data-parallel training differ.

The model runs on the full batch and on each replica's shard, with forward hooks on every
submodule (see :mod:`fdp.testing._trace`). The first call, in execution order, whose output
rows on a shard differ from the full batch's is the culprit; with the reference values forced
back in, every later layer is judged too, so several culprits can be named. A second
full-batch run with another seed finds layers that draw random numbers.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fdp._compat import BatchNormBase, pytree
from fdp.testing._spec import Spec, call_args, shard
from fdp.testing._trace import Finding, Tracer, difference

__all__ = ["diagnose"]


def diagnose(spec: Spec, sizes: tuple[int, ...], bad_buffers: list[str], raised: bool,
             ragged: bool = False) -> list[str]:
    """Lines that explain the difference, most specific first (never empty).

    ``raised``: the data-parallel run raised (rather than giving other numbers);
    ``ragged``: the mesh's backend runs shards of different sizes in one step (else
    ``"sync"`` needs equal shards: the vmap backend).
    """
    split_even = ragged or len(set(sizes)) == 1
    module, params, buffers, per_layer = _target(spec)
    runner = _Runner(module, params, buffers, spec)
    reference = runner.reference()
    if isinstance(reference, BaseException):
        return [f"(the per-layer diagnosis could not run the model: "
                f"{type(reference).__name__}: {_first_line(reference)})"]
    findings = runner.random_layers(reference) + runner.shard_findings(reference, sizes)
    inside = _loss_inside(spec, reference, runner.shard_outputs, sizes)
    if inside is not None:  # the root's scalar loss is what "mixes" the rows: say why
        findings = [f for f in findings if f.name != "" or f.kind == "raises"]
    lines = ([inside] if inside else []) + _describe_all(findings, spec, per_layer,
                                                          split_even, sizes)
    lines += _buffer_lines(bad_buffers, module if per_layer else None, findings, spec)
    if not findings:
        loss_line = _loss_line(spec, _root_output(reference), sizes)
        lines += [loss_line] if loss_line else []
    if lines:
        return lines
    if raised:
        return ["no layer breaks equivalence (on every replica's shard each layer's output "
                "rows equal the full batch's; fdp.nn.SyncBatchNorm layers are taken to "
                "synchronize): the error above is about the data-parallel setup"]
    return ["no culprit found: on every replica's shard each layer's output rows equal the "
            "full batch's, and loss_fn is a per-example mean; a custom autograd.Function whose "
            "backward mixes rows may explain the difference"]


# --- the module to trace ----------------------------------------------------------------------

class _ApplyModule(nn.Module):
    """An ``fdp.Model`` without its module: traced as one opaque layer."""

    def __init__(self, apply: Callable[..., Any], params: dict, buffers: dict) -> None:
        super().__init__()
        self.fn, self.params, self.state = apply, params, buffers

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        fresh = {k: v.clone() for k, v in self.state.items()}
        return self.fn(self.params, fresh, *args, **kwargs)[0]


def _closure_module(apply: Callable[..., Any]) -> nn.Module | None:
    """The module behind an ``apply`` built by :func:`fdp.functionalize`, if there is one."""
    module = getattr(apply, "module", None)
    return module if isinstance(module, nn.Module) else None


def _target(spec: Spec) -> tuple[nn.Module, dict, dict, bool]:
    """``(private module copy, params, buffers, per_layer)`` for tracing."""
    module = spec.module
    if module is None and spec.model is not None:
        module = _closure_module(spec.model.apply)
    if module is not None:
        names = {k for k, _ in module.named_parameters()}
        if names == spec.params.keys() and \
                {k for k, _ in module.named_buffers()} == spec.buffers.keys():
            return copy.deepcopy(module), spec.params, spec.buffers, True
    assert spec.model is not None
    return _ApplyModule(spec.model.apply, spec.params, spec.buffers), {}, {}, False


def _sync_layers(module: nn.Module) -> list[nn.Module]:
    try:
        from fdp.nn import SyncBatchNorm
    except ImportError:  # pragma: no cover - fdp.nn ships with fdp
        return []
    return [m for m in module.modules() if isinstance(m, SyncBatchNorm)]


def _passthrough(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


# --- running the traces -----------------------------------------------------------------------

class _Runner:
    def __init__(self, module: nn.Module, params: dict, buffers: dict, spec: Spec) -> None:
        self.module, self.params, self.buffers, self.spec = module, params, buffers, spec
        self.names = {id(m): name for name, m in module.named_modules()}
        self.synced = {self.names[id(m)] for m in _sync_layers(module)}
        self.shard_outputs: list[tuple[int, int, Any]] = []  # (offset, rows, root output)

    @contextlib.contextmanager
    def _hooks(self, tracer: Tracer, stub_sync: bool = False) -> Iterator[None]:
        handles = []
        for m in dict.fromkeys(self.module.modules()):
            handles.append(m.register_forward_pre_hook(tracer.pre, with_kwargs=True))
            handles.append(m.register_forward_hook(tracer.post, with_kwargs=True))
        stubs = _sync_layers(self.module) if stub_sync else []
        for layer in stubs:  # they synchronize under DP: trust them, take the reference rows
            layer.forward = _passthrough
        try:
            yield
        finally:
            for layer in stubs:
                del layer.forward
            for h in handles:
                h.remove()

    def run(self, tracer: Tracer, batch: Any, seed: int,
            stub_sync: bool = False) -> BaseException | None:
        args, kwargs = call_args(self.spec.inputs(batch))
        state = {**self.params, **{k: v.clone() for k, v in self.buffers.items()}}
        torch.manual_seed(seed)
        with self._hooks(tracer, stub_sync), torch.no_grad():
            try:
                functional_call(self.module, state, tuple(args), kwargs)
            except Exception as e:  # reported as a finding
                return e
        return None

    def reference(self) -> Tracer | BaseException:
        tracer = Tracer(self.names)
        error = self.run(tracer, self.spec.batch, seed=1)
        return tracer if error is None else error

    def random_layers(self, reference: Tracer) -> list[Finding]:
        rows = self.spec.rows
        again = self._compare(reference, (0, rows))
        self.run(again, self.spec.batch, seed=2)
        return [f._replace(kind="random") for f in _unique(again.findings)]

    def shard_findings(self, reference: Tracer, sizes: tuple[int, ...]) -> list[Finding]:
        found: list[Finding] = []
        offset = 0
        for i, size in enumerate(sizes):
            if size:
                skip = self.synced | {f.name for f in found if f.kind == "random"}
                tracer = self._compare(reference, (offset, size), frozenset(skip))
                part = shard(self.spec.batch, offset, size, self.spec.rows)
                error = self.run(tracer, part, seed=3 + i, stub_sync=True)
                self.shard_outputs.append((offset, size, _root_output(tracer)))
                found += [f._replace(detail=f"replica {i}: {f.detail}")
                          for f in tracer.findings]
                if error is not None:
                    found.append(_raised(tracer, error, i, size))
            offset += size
        return found

    def _compare(self, reference: Tracer, rows: tuple[int, int],
                 skip: frozenset[str] = frozenset()) -> Tracer:
        return Tracer(self.names, reference.events, rows, self.spec.rows, self.spec.rtol,
                      self.spec.atol, skip)


def _raised(tracer: Tracer, error: BaseException, replica: int, size: int) -> Finding:
    where = tracer.running()
    detail = (f"on replica {replica}'s shard of {size} row{'s' * (size != 1)} it raises "
              f"{type(error).__name__}: {_first_line(error)}")
    if where is None:
        return Finding("inputs", "", None, detail)
    return Finding("raises", where[0], where[1], detail)


def _unique(findings: list[Finding]) -> list[Finding]:
    seen: dict[str, Finding] = {}
    for f in findings:
        seen.setdefault(f.name, f)
    return list(seen.values())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().split("\n")[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _root_output(reference: Tracer) -> Any:
    outs = [value for kind, name, value in reference.events if kind == "out" and name == ""]
    return outs[-1] if outs else None


# --- describing the culprits ------------------------------------------------------------------

def _where(name: str, module: nn.Module | None) -> str:
    kind = type(module).__name__ if module is not None else "the model"
    return f"{kind} at {name!r}" if name else f"{kind} (the root module)"


def _is_batch_stat_norm(module: nn.Module | None) -> bool:
    if not isinstance(module, BatchNormBase):
        return False
    return module.training or module.running_mean is None


def _describe_all(findings: list[Finding], spec: Spec, per_layer: bool, split_even: bool,
                  sizes: tuple[int, ...]) -> list[str]:
    """One line per culprit; layers of one type with the same problem share a line (twenty
    BatchNorm layers are one line with a count)."""
    by_name: dict[str, list[Finding]] = {}
    for f in findings:
        by_name.setdefault(f.name, []).append(f)
    kinds: dict[tuple, list[list[Finding]]] = {}
    for group in by_name.values():
        f = group[0]
        key = (f.kind, type(f.module), any(g.kind == "raises" for g in group)) \
            if f.name else ("root", f.name)
        kinds.setdefault(key, []).append(group)
    lines = []
    for groups in kinds.values():
        names = [g[0].name for g in groups]
        lines.append(_describe(groups[0], spec, per_layer, split_even, sizes, names[1:]))
    return lines


def _describe(group: list[Finding], spec: Spec, per_layer: bool, split_even: bool,
              sizes: tuple[int, ...], alike: list[str] | None = None) -> str:
    f = group[0]
    raised = next((g.detail for g in group if g.kind == "raises"), None)
    where = _where(f.name, f.module) if per_layer else "the model (fdp.Model.apply)"
    if alike and per_layer:
        kind = type(f.module).__name__
        shown = ", ".join(repr(n) for n in alike[:3]) + (", ..." if len(alike) > 3 else "")
        where = f"{where} and {len(alike)} more {kind} layer{'s' * (len(alike) > 1)} ({shown})"
    if f.kind == "random":
        return _random_line(where, f.module)
    if _is_batch_stat_norm(f.module):
        return _batchnorm_line(where, raised, split_even, sizes)
    if f.kind == "inputs":
        return f"inputs(batch) does not give a shard the model's input rows for it: {f.detail}"
    if f.kind == "raises":
        return f"{where}: {f.detail}"
    suffix = "" if per_layer else (" (pass the nn.Module, or build the Model with "
                                   "fdp.functionalize, to name the layer)")
    if f.kind == "own_code":
        return (f"{where} mixes examples across the batch in its own forward code: the rows "
                f"it passes to {f.before} depend on other rows, so a per-replica shard gives "
                f"different values ({f.detail}){suffix}")
    return (f"{where} mixes examples across the batch: its output rows depend on other rows, "
            f"so a per-replica shard gives different values ({f.detail}){suffix}")


def _batchnorm_line(where: str, raised: str | None, split_even: bool,
                    sizes: tuple[int, ...]) -> str:
    even = "" if split_even else (
        f" and a split into equal shards (the vmap backend's 'sync' needs them; this split "
        f"gives {sizes})")
    also = f"; {raised}" if raised else ""
    return (f"{where} uses per-replica batch statistics: in training each replica normalizes "
            f"with the mean and variance of its own shard{also}. Use buffer_policy='sync' with "
            f"fdp.nn.convert_sync_batchnorm(model){even}, or eval mode")


def _random_line(where: str, module: nn.Module | None) -> str:
    what = "draws random numbers in training mode" if isinstance(
        module, nn.modules.dropout._DropoutNd) else "gives other values on every run " \
        "(random numbers in its forward)"
    return (f"{where} {what}: under data parallelism each replica draws its own values, so "
            f"training equals single-device training only in distribution. Check equivalence "
            f"in eval mode (model.eval()), or make it keyed: fdp.nn.convert_dropout(model) with "
            f"a key (data_parallel_step(..., key=fdp.random.key(0))) draws per example, "
            f"equal to single-device training")


def _buffer_lines(keys: list[str], module: nn.Module | None, findings: list[Finding],
                  spec: Spec) -> list[str]:
    explained = {f.name for f in findings}
    lines = []
    for key in keys:
        owner_name = key.rpartition(".")[0]
        if owner_name in explained:
            continue
        owner = _submodule(module, owner_name)
        where = _where(owner_name, owner) if owner is not None else "the model"
        if spec.buffer_policy is None:
            lines.append(f"buffers[{key!r}] of {where} changes in single-device training, but "
                         f"with buffer_policy=None data-parallel training keeps buffers fixed; "
                         f"pass buffer_policy='replica0', 'mean' or 'sync'")
        else:
            lines.append(f"buffers[{key!r}] of {where}: its update depends on which rows a "
                         f"replica holds, and buffer_policy={spec.buffer_policy!r} does not "
                         f"combine the replicas' values into the full-batch update")
    return lines


def _submodule(module: nn.Module | None, name: str) -> nn.Module | None:
    if module is None:
        return None
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _loss_line(spec: Spec, outputs: Any, sizes: tuple[int, ...]) -> str | None:
    """Whether ``loss_fn`` is the per-example mean (or sum) the weighted strategy needs."""
    if spec.strategy != "weighted" or outputs is None:
        return None
    with torch.no_grad():
        full = spec.loss_fn(outputs, spec.batch)
        parts, offset = [], 0
        for size in sizes:
            if size:
                loss = spec.loss_fn(_rows(outputs, offset, size, spec.rows),
                                    shard(spec.batch, offset, size, spec.rows))
                parts.append(loss * (size / spec.rows if spec.reduction == "mean" else 1.0))
            offset += size
        combined = torch.stack(parts).sum()
    if not isinstance(full, torch.Tensor) or difference(combined, full.detach(), spec.rtol,
                                                          spec.atol) is None:
        return None
    word = "mean" if spec.reduction == "mean" else "sum"
    return (f"loss_fn is not a {word} of per-example terms: combining its values on the "
            f"replicas' shards gives {combined.item():.6g}, on the full batch it is "
            f"{full.item():.6g}. The default strategy='weighted' needs such a loss; for any "
            f"other criterion use strategy='gather' (nn.DataParallel's semantics)")


def _loss_inside(spec: Spec, reference: Tracer, shards: list[tuple[int, int, Any]],
                 sizes: tuple[int, ...]) -> str | None:
    """A model that computes its loss in ``forward`` (a scalar output, as Hugging Face models do
    with ``labels=``): whether that loss combines over the replicas as the strategy needs.
    ``None``: the model returns no scalar; ``""``: it does, and it combines exactly."""
    full_out = _root_output(reference)
    scalars = [p for p, x in _tree_paths(full_out) if isinstance(x, torch.Tensor) and x.dim() == 0]
    if not scalars or spec.strategy != "weighted" or any(o is None for _, _, o in shards):
        return None
    with torch.no_grad():
        full = spec.loss_fn(full_out, spec.batch)
        parts = [spec.loss_fn(out, shard(spec.batch, offset, size, spec.rows))
                 * (size / spec.rows if spec.reduction == "mean" else 1.0)
                 for offset, size, out in shards]
        combined = torch.stack(parts).sum()
    if not isinstance(full, torch.Tensor) or difference(combined, full.detach(), spec.rtol,
                                                          spec.atol) is None:
        return ""
    word = "mean" if spec.reduction == "mean" else "sum"
    return (f"the model computes the loss inside its forward (a scalar at out{scalars[0]}), "
            f"and it is not a {word} of per-example terms: each replica's loss weighted by its "
            f"rows gives {combined.item():.6g}, the full batch {full.item():.6g}. A mean over "
            f"tokens with padding ignored (labels=-100, as in Hugging Face models) is such a "
            f"loss. Return per-example (per-token) outputs and compute the loss in loss_fn "
            f"with strategy='gather' (nn.DataParallel's semantics), or make it a per-example "
            f"mean")


def _tree_paths(tree: Any) -> list[tuple[str, Any]]:
    pairs, _ = pytree.tree_flatten_with_path(tree)
    return [(pytree.keystr(path), leaf) for path, leaf in pairs]


def _rows(tree: Any, offset: int, size: int, total: int) -> Any:
    return pytree.tree_map(
        lambda x: x.narrow(0, offset, size)
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == total else x, tree)
