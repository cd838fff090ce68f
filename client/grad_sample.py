"""Per-sample gradients of every trainable parameter in one backward pass (pure torch, no Opacus).

Only parameters with ``requires_grad`` count (``training.trainable`` freezes the rest): a layer
without any is never hooked, and autograd carries only input gradients through it.

Opacus' hooks let autograd compute the summed weight gradient *and* then compute the
per-sample ones on top, so DP-SGD pays for the weight gradient twice (~1.8x a plain step
on fedsynth's UNet). Here autograd only carries gradients from layer to layer:
``torch.autograd.grad`` is asked for the layers' outputs at the root of the graph, so no
weight-gradient kernel runs and no ``.grad`` is accumulated. Each layer's per-sample weight
gradient is computed once (client/grad_kernels.py), as the gradient of its output arrives.

Memory: the per-sample gradients of most layers are kept as rows of one ``(N, P)`` buffer.
A Conv2d or Linear layer whose per-sample weight gradients are several times bigger than its
input and output gradient together (many channels on a small map: the bulk of a UNet's
parameters) keeps only those two tensors and its per-sample norms; its clipped sum is
computed later by one batched kernel with per-sample-scaled output gradients (the
"book-keeping" trick of Bu et al.).

Several rows per sample (noise multiplicity): the forward may run on each sample repeated ``k``
times in a row (``repeat_interleave``), its loss being the mean of its rows' losses. A sample's
gradient is then the sum of its ``k`` rows' gradients (each already carries the 1/k of the mean),
folded before any norm is taken, so one sample is still one clipped gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from client.grad_kernels import KERNELS, WEIGHTED, check_supported


# Deferring a layer saves (per-sample gradients - input - output gradient) of memory and costs one
# batched weight-gradient kernel more, whose time grows with the map size: the smallest maps are the
# best trade. Measured on the medium UNet at 32 px (bench/perf_dp.py, CPU time and peak RSS vs
# non-DP): never 1.18x / 1.31x, factor 4 1.20x / 1.15x, factor 1 1.29x / 1.07x.
DEFER_FACTOR = 4.0


def defer(weight_numel: int, batch: int, input_numel: int, output_numel: int) -> bool:
    """Keep the layer's input and output gradient instead of its per-sample gradients?"""
    return batch * weight_numel > DEFER_FACTOR * (input_numel + output_numel)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: list[nn.Parameter]
    deferred: bool | None = None  # decided at the first backward, from the first forward's sizes
    calls: int = 0
    sizes: tuple[int, int, int] = (0, 0, 0)  # batch, input numel, output numel of the first call


@dataclass
class PerSampleGrads:
    """One batch's per-sample gradients; valid until the sampler's next ``backward``."""

    sampler: GradSampler
    rows: torch.Tensor  # (N, P_kept): materialised per-sample gradients
    deferred: list[tuple[_Layer, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (layer, a, b)
    deferred_sq_norms: torch.Tensor | None = None  # (N,)
    repeats: int = 1  # rows of the forward pass per sample: a deferred layer's a and b have N * repeats rows

    def sq_norms(self) -> torch.Tensor:
        """``||g_i||^2`` over all parameters, ``(N,)``."""
        sq = torch.linalg.vector_norm(self.rows, dim=1).square()
        return sq if self.deferred_sq_norms is None else sq + self.deferred_sq_norms

    @torch.no_grad()
    def weighted_sum(self, c: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """``sum_i c_i g_i`` per parameter."""
        kept = c.to(self.rows.dtype) @ self.rows  # a GEMV: no scaled (N, P) copy
        out = self.sampler._views(kept)
        c_rows = c.repeat_interleave(self.repeats) if self.repeats > 1 else c  # every row of sample i scaled by c_i
        for layer, a, b in self.deferred:
            for pname, g in WEIGHTED[type(layer.module)](layer.module, a, b, c_rows).items():
                out[getattr(layer.module, pname)] = g
        return out

    @torch.no_grad()
    def materialise(self) -> dict[nn.Parameter, torch.Tensor]:
        """Every parameter's ``(N, *shape)`` per-sample gradients (tests; costs the memory deferral saves)."""
        out = self.sampler._views(self.rows)
        for layer, a, b in self.deferred:
            for pname, g in KERNELS[type(layer.module)](layer.module, a, b, {}).items():
                out[getattr(layer.module, pname)] = fold_rows(g, self.repeats)
        return out


def fold_rows(g: torch.Tensor, repeats: int) -> torch.Tensor:
    """Per-row gradients ``(N * repeats, ...)`` -> per-sample ``(N, ...)``: the sum of each sample's rows."""
    if repeats == 1:
        return g
    return g.view(-1, repeats, *g.shape[1:]).sum(dim=1)


class GradSampler:
    """Per-sample gradients of ``model``'s trainable parameters.

    Usage::

        sampler = GradSampler(model)
        with sampler.recording():
            losses = per_sample_loss(model, batch)        # (N,)
        grads = sampler.backward(losses)                  # PerSampleGrads
        grads.sq_norms(); grads.weighted_sum(c)

    Row ``i`` is the gradient of ``losses[i]`` alone: the batch's samples must not interact
    in the forward pass (no BatchNorm), which holds for the layers supported. With
    ``backward(losses, repeats=k)`` the forward ran on ``k`` consecutive rows per sample and
    ``losses[i]`` depends on rows ``i*k .. i*k+k-1`` only.

    The kept rows live in one buffer reused across steps (grown to the largest batch seen):
    many per-layer tensors allocated and freed every step fragment the heap, and the
    process's RSS then creeps up step after step.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[_Layer] = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if params:
                check_supported(module, name)
                self.layers.append(_Layer(name, module, params))
                covered.update(id(p) for p in params)
        self.params = [p for p in model.parameters() if p.requires_grad]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise NotImplementedError(f"per-sample gradients: parameters outside any layer: {missing[:3]}")
        if len({(p.device, p.dtype) for p in self.params}) > 1:
            raise NotImplementedError("per-sample gradients: trainable parameters on several devices or dtypes")
        self._by_module = {id(layer.module): layer for layer in self.layers}
        self._offsets: dict[int, tuple[int, int]] | None = None  # per kept parameter, once the layout is fixed
        self._buffer: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self._written: set[int] = set()
        self._roots: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._deferred: list[tuple[_Layer, torch.Tensor, torch.Tensor]] = []
        self._deferred_sq: torch.Tensor | None = None
        self._samples = 0  # N and rows per sample of the backward in progress
        self._repeats = 1
        for layer in self.layers:
            layer.calls = 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the layers' inputs during the forward pass run inside the block."""
        self._reset()
        handles = [layer.module.register_forward_hook(self._on_forward) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _on_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None
        layer = self._by_module[id(module)]
        layer.calls += 1
        if layer.calls == 1 and layer.deferred is None:
            layer.sizes = (args[0].shape[0], args[0].numel(), output.numel())
        a = args[0].detach()
        if not args[0].requires_grad:
            # Nothing upstream needs a gradient (the first conv, the time and class embeddings): cut the
            # output loose so autograd never computes this layer's weight gradient, and ask for its gradient.
            leaf = output.detach().requires_grad_(True)
            self._roots.append((module, a, leaf))
            return leaf
        # The graph keeps its hooks alive until it is freed: hold the input in a box the hook
        # empties, or every layer input would live to the end of the backward pass.
        box = [(a, a._version)]
        output.register_hook(partial(self._on_grad, module, box))
        return None

    def _on_grad(self, module: nn.Module, box: list[tuple[torch.Tensor, int]], b: torch.Tensor) -> None:
        a, version = box.pop()
        if a._version != version:
            raise RuntimeError(f"per-sample gradients: the input of a {type(module).__name__} was modified in place "
                               "after the layer ran; its per-sample gradient would be wrong")
        self._accumulate(module, a, b)

    def _fix_layout(self) -> None:
        """Decide, once, which layers keep rows in the buffer and which are deferred."""
        offset, self._offsets = 0, {}
        for layer in self.layers:
            rows, a_numel, out_numel = layer.sizes
            batch = rows // self._repeats  # the per-sample gradients kept are per sample, not per row
            # A deferred layer's norms and clipped sums cover all its parameters: only a wholly trainable
            # layer may be deferred (a frozen weight's gradient must not count towards a sample's norm).
            whole = len(layer.params) == len(list(layer.module.parameters(recurse=False)))
            layer.deferred = (type(layer.module) in WEIGHTED and layer.calls == 1 and batch > 0 and whole
                              and defer(layer.module.weight.numel(), batch, a_numel, out_numel))
            if not layer.deferred:
                for p in layer.params:
                    self._offsets[id(p)] = (offset, p.numel())
                    offset += p.numel()
        self._kept_size = offset

    def _rows(self, n: int) -> torch.Tensor:
        if self._offsets is None:
            self._fix_layout()
        ref = self.params[0]
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = None  # free the old one first
            self._buffer = torch.empty((n, self._kept_size), device=ref.device, dtype=ref.dtype)
        return self._buffer[:n]

    def _slot(self, p: nn.Parameter, n: int) -> torch.Tensor:
        rows = self._rows(n)
        offset, size = self._offsets[id(p)]  # type: ignore[index]
        return rows[:, offset:offset + size].view(n, *p.shape)

    @torch.no_grad()  # the root layers' kernels run after autograd.grad returned: keep them off any graph
    def _accumulate(self, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        n, k, layer = self._samples, self._repeats, self._by_module[id(module)]
        if a.shape[0] != n * k:
            raise RuntimeError(f"per-sample gradients: layer '{layer.name}' saw a batch of {a.shape[0]} rows; "
                               f"expected {n} samples x {k} rows each")
        self._rows(n)  # fixes the layout at the first backward
        if layer.deferred:
            if layer.calls != 1:
                raise RuntimeError(f"per-sample gradients: layer '{layer.name}' ran {layer.calls} times in one forward "
                                   "pass; it was laid out for one")
            # The norm of a sample's summed rows, not the sum of its rows' norms.
            sq = sum(torch.linalg.vector_norm(fold_rows(g, k).reshape(n, -1), dim=1).square()
                     for g in KERNELS[type(module)](module, a, b, {}).values())
            self._deferred_sq = sq if self._deferred_sq is None else self._deferred_sq + sq
            self._deferred.append((layer, a, b))
            return
        # Folding needs the per-row result first: the buffer's (N, ...) slots cannot take N * k rows.
        free = {name: self._slot(p, n) for name, p in module.named_parameters(recurse=False)
                if p.requires_grad and id(p) not in self._written} if k == 1 else {}
        for pname, g in KERNELS[type(module)](module, a, b, free).items():
            g = fold_rows(g, k)
            p = getattr(module, pname)
            if not p.requires_grad:
                continue
            if id(p) in self._written:  # a layer called more than once per forward gets the sum of its calls
                self._slot(p, n).add_(g)
                continue
            if g is not free.get(pname):
                self._slot(p, n).copy_(g)
            self._written.add(id(p))

    def backward(self, losses: torch.Tensor, repeats: int = 1) -> PerSampleGrads:
        """Per-sample gradients of ``losses`` (shape ``(N,)``, one loss per sample).

        Args:
            repeats: rows per sample in the recorded forward pass, sample ``i`` being rows
                ``i*repeats .. i*repeats+repeats-1`` (``repeat_interleave``); 1: one row each.
        """
        if losses.dim() != 1:
            raise ValueError(f"expected one loss per sample, shape (N,), got {tuple(losses.shape)}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        self._samples, self._repeats = losses.shape[0], repeats
        roots = self._roots
        if not roots:
            raise RuntimeError("per-sample gradients: no recorded forward pass (run the model inside recording()), "
                               "or the model input requires grad")
        root_grads = torch.autograd.grad(losses.sum(), [leaf for _, _, leaf in roots], allow_unused=True)
        for (module, a, leaf), b in zip(roots, root_grads):
            self._accumulate(module, a, b if b is not None else torch.zeros_like(leaf))
        n = losses.shape[0]
        rows = self._rows(n)
        for layer in self.layers:  # a parameter the loss does not reach has a zero gradient
            for p in layer.params:
                if not layer.deferred and id(p) not in self._written:
                    self._slot(p, n).zero_()
        grads = PerSampleGrads(self, rows, self._deferred, self._deferred_sq, repeats)
        self._reset()
        return grads

    def _views(self, kept: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Per-parameter views of buffer-shaped ``(N, P_kept)`` rows or a ``(P_kept,)`` vector."""
        lead = tuple(kept.shape[:-1])
        out = {}
        for p in self.params:
            if id(p) in self._offsets:  # type: ignore[operator]
                offset, size = self._offsets[id(p)]  # type: ignore[index]
                out[p] = kept[..., offset:offset + size].reshape(*lead, *p.shape)
        return out
