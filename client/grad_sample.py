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

# (module, layer input, gradient of the layer output) -> per-sample gradient per parameter name
Kernel = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


# Output maps of at least this many pixels: one weight-gradient call per sample; smaller ones: one
# grouped call for the whole batch. Measured on CPU (bench/perf_dp.py): per-sample calls match the
# batched kernel on large maps but pay a fixed cost per call that dominates on small maps.
LOOP_MIN_PIXELS = 1024


def _conv2d(module: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample weight gradients with the weight-gradient kernel autograd itself would use.

    unfold + bmm (Opacus' way) was 1.5-3x slower here and materialises a k*k-fold copy of the input.
    """
    w = module.weight
    a, b = a.to(w.dtype), b.to(w.dtype)
    n = a.shape[0]
    args = (list(module.stride), list(module.padding), list(module.dilation), False, [0, 0])
    if b.shape[2] * b.shape[3] >= LOOP_MIN_PIXELS:
        gw = torch.empty((n, *w.shape), device=w.device, dtype=w.dtype)
        for i in range(n):
            gw[i] = torch.ops.aten.convolution_backward(b[i:i + 1], a[i:i + 1], w, None, *args, module.groups,
                                                        [False, True, False])[1]
    else:
        # The batch as groups: sample i's input channels only meet sample i's output channels.
        grouped = w.repeat(n, 1, 1, 1)
        gw = torch.ops.aten.convolution_backward(b.reshape(1, -1, *b.shape[2:]), a.reshape(1, -1, *a.shape[2:]), grouped,
                                                 None, *args, module.groups * n, [False, True, False])[1]
        gw = gw.view(n, *w.shape)
    out = {"weight": gw}
    if module.bias is not None:
        out["bias"] = b.sum(dim=(2, 3))
    return out


def _linear(module: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    w = module.weight
    n = a.shape[0]
    a3 = a.to(w.dtype).reshape(n, -1, a.shape[-1])  # (N, tokens, in); tokens = 1 for a plain (N, in) input
    b3 = b.to(w.dtype).reshape(n, -1, b.shape[-1])
    out = {"weight": torch.bmm(b3.transpose(1, 2), a3)}
    if module.bias is not None:
        out["bias"] = b3.sum(dim=1)
    return out


def _group_norm(module: nn.GroupNorm, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    w = module.weight
    x_hat = F.group_norm(a.to(w.dtype), module.num_groups, eps=module.eps)
    b = b.to(w.dtype)
    dims = tuple(range(2, a.dim()))
    out = {}
    if module.weight is not None:
        out["weight"] = (b * x_hat).sum(dim=dims)
    if module.bias is not None:
        out["bias"] = b.sum(dim=dims)
    return out


def _embedding(module: nn.Embedding, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
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
    """Computes ``(N, *param.shape)`` per-sample gradients of ``model``'s trainable parameters.

    Usage::

        sampler = GradSampler(model)
        with sampler.recording():
            losses = per_sample_loss(model, batch)        # (N,)
        grads = sampler.backward(losses)                  # {param: (N, *param.shape)}

    ``grads[p][i]`` is the gradient of ``losses[i]`` alone: the batch's samples must not
    interact in the forward pass (no BatchNorm), which holds for the layers supported.
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
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise NotImplementedError(f"per-sample gradients: parameters outside any layer: {missing[:3]}")
        self._grads: dict[nn.Parameter, torch.Tensor] = {}
        self._roots: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._recording = False

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the layers' inputs during the forward passes run inside the block."""
        self._grads, self._roots = {}, []
        handles = [module.register_forward_hook(self._on_forward) for _, module in self.layers]
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
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

    def _accumulate(self, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        for pname, g in KERNELS[type(module)](module, a, b).items():
            p = getattr(module, pname)
            if not p.requires_grad:
                continue
            # A layer called more than once per forward (weight sharing) gets the sum of its calls.
            self._grads[p] = self._grads[p] + g if p in self._grads else g

    def backward(self, losses: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Per-sample gradients of ``losses`` (shape ``(N,)``, one loss per sample)."""
        if losses.dim() != 1:
            raise ValueError(f"expected one loss per sample, shape (N,), got {tuple(losses.shape)}")
        roots = self._roots
        if not roots:
            raise RuntimeError("per-sample gradients: no recorded forward pass (run the model inside recording()), "
                               "or the model input requires grad")
        root_grads = torch.autograd.grad(losses.sum(), [leaf for _, _, leaf in roots], allow_unused=True)
        for (module, a, leaf), b in zip(roots, root_grads):
            self._accumulate(module, a, b if b is not None else torch.zeros_like(leaf))
        grads, self._grads, self._roots = self._grads, {}, []
        for p in self.model.parameters():  # a parameter the loss does not reach has a zero gradient
            if p.requires_grad and p not in grads:
                grads[p] = torch.zeros((losses.shape[0], *p.shape), device=p.device, dtype=p.dtype)
        return grads
