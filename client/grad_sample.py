"""Per-sample gradients of every trainable parameter in one backward pass (pure torch, no Opacus).

Opacus' hooks let autograd compute the summed weight gradient *and* then compute the
per-sample ones on top, so DP-SGD pays for the weight gradient twice (~1.8x a plain step
on fedsynth's UNet). Here autograd only carries gradients from layer to layer:
``torch.autograd.grad`` is asked for the inputs of the network, so no weight-gradient
kernel runs and no ``.grad`` is accumulated. Each layer's per-sample weight gradient is
computed once, from the layer's saved input and the gradient of its output, as that
gradient arrives.

Supported layers are exactly those of MONAI's ``DiffusionModelUNet``: ``Conv2d``,
``Linear``, ``GroupNorm`` and ``Embedding``. A model with any other layer holding
parameters is refused with the layer's name (use Opacus' ``hooks`` mode for it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# (module, layer input, gradient of the layer output, where to write) -> per-sample gradient per
# parameter name. A kernel may write a result straight into the ``(N, *shape)`` view it is offered
# (and return that view) to spare a copy of the largest tensors of the step.
Kernel = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


# Which kernel computes a conv layer's per-sample weight gradients, measured per layer shape on
# this project's 2-core CPU (bench/perf_dp.py; N = 16): one call per sample with the kernel autograd
# itself uses is within 0.9-1.3x of the batched gradient on large maps or many channels, but pays a
# fixed cost per call on small layers; one grouped call for the whole batch (the batch as groups)
# wins there, and loses badly (up to 5x) once a group holds many channels. unfold + bmm (Opacus'
# way) was never the best and materialises a k*k-fold copy of the input.
LOOP_MIN_PIXELS = 1024
GROUPED_MAX_CHANNELS = 128 * 64  # (input channels per group) x (output channels)


def _use_grouped(module: nn.Conv2d, b: torch.Tensor) -> bool:
    if b.device.type != "cpu":  # one launch instead of N on an accelerator (not measured here)
        return True
    small_map = b.shape[2] * b.shape[3] < LOOP_MIN_PIXELS
    return small_map and module.weight.shape[0] * module.weight.shape[1] <= GROUPED_MAX_CHANNELS


def _conv2d(module: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample weight gradients with the weight-gradient kernel autograd itself would use."""
    w = module.weight
    a, b = a.to(w.dtype), b.to(w.dtype)
    n = a.shape[0]
    args = (list(module.stride), list(module.padding), list(module.dilation), False, [0, 0])
    if _use_grouped(module, b):
        # Sample i's input channels only meet sample i's output channels.
        grouped = w.repeat(n, 1, 1, 1)
        gw = torch.ops.aten.convolution_backward(b.reshape(1, -1, *b.shape[2:]), a.reshape(1, -1, *a.shape[2:]), grouped,
                                                 None, *args, module.groups * n, [False, True, False])[1]
        gw = gw.view(n, *w.shape)
    else:
        gw = out["weight"] if "weight" in out else torch.empty((n, *w.shape), device=w.device, dtype=w.dtype)
        for i in range(n):
            gw[i] = torch.ops.aten.convolution_backward(b[i:i + 1], a[i:i + 1], w, None, *args, module.groups,
                                                        [False, True, False])[1]
    grads = {"weight": gw}
    if module.bias is not None:
        grads["bias"] = b.sum(dim=(2, 3))
    return grads


def _linear(module: nn.Linear, a: torch.Tensor, b: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w = module.weight
    n = a.shape[0]
    a3 = a.to(w.dtype).reshape(n, -1, a.shape[-1])  # (N, tokens, in); tokens = 1 for a plain (N, in) input
    b3 = b.to(w.dtype).reshape(n, -1, b.shape[-1])
    grads = {"weight": torch.bmm(b3.transpose(1, 2), a3)}
    if module.bias is not None:
        grads["bias"] = b3.sum(dim=1)
    return grads


def _group_norm(module: nn.GroupNorm, a: torch.Tensor, b: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w = module.weight
    x_hat = F.group_norm(a.to(w.dtype), module.num_groups, eps=module.eps)
    b = b.to(w.dtype)
    dims = tuple(range(2, a.dim()))
    grads = {}
    if module.weight is not None:
        grads["weight"] = (b * x_hat).sum(dim=dims)
    if module.bias is not None:
        grads["bias"] = b.sum(dim=dims)
    return grads


def _embedding(module: nn.Embedding, a: torch.Tensor, b: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w = module.weight
    n, rows = a.shape[0], w.shape[0]
    index = a.reshape(n, -1)
    if module.padding_idx is not None:  # the padding row never receives a gradient
        keep = index != module.padding_idx
    else:
        keep = torch.ones_like(index, dtype=torch.bool)
    flat = (index + rows * torch.arange(n, device=index.device)[:, None])[keep]
    values = b.to(w.dtype).reshape(n, -1, w.shape[1])[keep]
    gw = torch.zeros((n * rows, w.shape[1]), device=w.device, dtype=w.dtype).index_add_(0, flat, values)
    return {"weight": gw.view(n, rows, w.shape[1])}


KERNELS: dict[type[nn.Module], Kernel] = {
    nn.Conv2d: _conv2d,
    nn.Linear: _linear,
    nn.GroupNorm: _group_norm,
    nn.Embedding: _embedding,
}


def _check_supported(module: nn.Module, name: str) -> None:
    if type(module) not in KERNELS:
        raise NotImplementedError(
            f"per-sample gradients: layer '{name}' ({type(module).__name__}) holds parameters but is not one of "
            f"{sorted(k.__name__ for k in KERNELS)}; use privacy.grad_sample_mode 'hooks' (Opacus) for this model"
        )
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        raise NotImplementedError(f"per-sample gradients: embedding '{name}' uses max_norm, scale_grad_by_freq or sparse")
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise NotImplementedError(f"per-sample gradients: conv '{name}' uses padding_mode {module.padding_mode!r}")


class GradSampler:
    """Per-sample gradients of ``model``'s trainable parameters, as one ``(N, P)`` matrix.

    Usage::

        sampler = GradSampler(model)
        with sampler.recording():
            losses = per_sample_loss(model, batch)        # (N,)
        flat = sampler.backward(losses)                   # (N, P), P = trainable parameters
        grads = sampler.per_param(flat)                   # {param: (N, *param.shape)} views

    Row ``i`` is the gradient of ``losses[i]`` alone: the batch's samples must not interact
    in the forward pass (no BatchNorm), which holds for the layers supported.

    The matrix lives in one buffer kept across steps (grown to the largest batch seen) and is
    overwritten by the next ``backward``: many per-layer tensors allocated and freed every
    step fragment the heap, and the process's RSS then creeps up step after step.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[tuple[str, nn.Module]] = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            _check_supported(module, name)
            self.layers.append((name, module))
            covered.update(id(p) for p in params)
        self.params = [p for p in model.parameters() if p.requires_grad]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise NotImplementedError(f"per-sample gradients: parameters outside any layer: {missing[:3]}")
        if len({(p.device, p.dtype) for p in self.params}) > 1:
            raise NotImplementedError("per-sample gradients: trainable parameters on several devices or dtypes")
        self._offsets: dict[int, tuple[int, int]] = {}
        offset = 0
        for p in self.params:
            self._offsets[id(p)] = (offset, p.numel())
            offset += p.numel()
        self.size = offset
        self._buffer: torch.Tensor | None = None
        self._written: set[int] = set()
        self._roots: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the layers' inputs during the forward passes run inside the block."""
        self._written, self._roots = set(), []
        handles = [module.register_forward_hook(self._on_forward) for _, module in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _on_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None
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

    def _slot(self, p: nn.Parameter, n: int) -> torch.Tensor:
        """Rows ``:n`` of ``p``'s columns in the buffer, shaped ``(n, *p.shape)``."""
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = None  # free the old one first
            self._buffer = torch.empty((n, self.size), device=p.device, dtype=p.dtype)
        offset, size = self._offsets[id(p)]
        return self._buffer[:n, offset:offset + size].view(n, *p.shape)

    @torch.no_grad()  # the root layers' kernels run after autograd.grad returned: keep them off any graph
    def _accumulate(self, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        n = a.shape[0]
        free = {name: self._slot(p, n) for name, p in module.named_parameters(recurse=False)
                if p.requires_grad and id(p) not in self._written}
        for pname, g in KERNELS[type(module)](module, a, b, free).items():
            p = getattr(module, pname)
            if not p.requires_grad:
                continue
            if id(p) in self._written:  # a layer called more than once per forward gets the sum of its calls
                self._slot(p, n).add_(g)
                continue
            if g is not free[pname]:
                free[pname].copy_(g)
            self._written.add(id(p))

    def backward(self, losses: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients of ``losses`` (shape ``(N,)``, one loss per sample) as an ``(N, P)`` matrix.

        The matrix is valid until the next call.
        """
        if losses.dim() != 1:
            raise ValueError(f"expected one loss per sample, shape (N,), got {tuple(losses.shape)}")
        roots = self._roots
        if not roots:
            raise RuntimeError("per-sample gradients: no recorded forward pass (run the model inside recording()), "
                               "or the model input requires grad")
        root_grads = torch.autograd.grad(losses.sum(), [leaf for _, _, leaf in roots], allow_unused=True)
        for (module, a, leaf), b in zip(roots, root_grads):
            self._accumulate(module, a, b if b is not None else torch.zeros_like(leaf))
        n = losses.shape[0]
        for p in self.params:  # a parameter the loss does not reach has a zero gradient
            if id(p) not in self._written:
                self._slot(p, n).zero_()
        self._written, self._roots = set(), []
        return self._buffer[:n]

    def per_param(self, flat: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Views of an ``(N, P)`` matrix or a ``(P,)`` vector, ``(N, *shape)`` or ``shape`` per parameter."""
        lead = tuple(flat.shape[:-1])
        out = {}
        for p in self.params:
            offset, size = self._offsets[id(p)]
            out[p] = flat[..., offset:offset + size].reshape(*lead, *p.shape)
        return out
