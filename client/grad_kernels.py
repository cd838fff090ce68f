"""Per-layer kernels behind :mod:`client.grad_sample`: per-sample weight gradients, and clipped sums.

Two kinds, per supported layer type (those of MONAI's ``DiffusionModelUNet``):

* ``KERNELS``: ``(N, *param.shape)`` per-sample gradients from the layer's input ``a`` and the
  gradient ``b`` of its output (per sample: the gradient of that sample's own loss);
* ``WEIGHTED``: ``sum_i c_i g_i`` straight from ``a`` and ``c``-scaled ``b``, with the batched
  kernel autograd uses, for layers whose per-sample gradients are not worth keeping.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _conv2d_weighted(module: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
    w = module.weight
    has_bias = module.bias is not None
    scaled = b.to(w.dtype) * c.to(w.dtype).view(-1, 1, 1, 1)
    _, gw, gb = torch.ops.aten.convolution_backward(
        scaled, a.to(w.dtype), w, [w.shape[0]] if has_bias else None, list(module.stride), list(module.padding),
        list(module.dilation), False, [0, 0], module.groups, [False, True, has_bias])
    return {"weight": gw, **({"bias": gb} if has_bias else {})}


def _linear_weighted(module: nn.Linear, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
    w = module.weight
    n = a.shape[0]
    scaled = (b.to(w.dtype).reshape(n, -1, b.shape[-1]) * c.to(w.dtype).view(-1, 1, 1)).reshape(-1, b.shape[-1])
    out = {"weight": scaled.T @ a.to(w.dtype).reshape(-1, a.shape[-1])}
    if module.bias is not None:
        out["bias"] = scaled.sum(dim=0)
    return out


WeightedKernel = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
WEIGHTED: dict[type[nn.Module], WeightedKernel] = {nn.Conv2d: _conv2d_weighted, nn.Linear: _linear_weighted}


def check_supported(module: nn.Module, name: str) -> None:
    if type(module) not in KERNELS:
        raise NotImplementedError(
            f"per-sample gradients: layer '{name}' ({type(module).__name__}) holds parameters but is not one of "
            f"{sorted(k.__name__ for k in KERNELS)}; use privacy.grad_sample_mode 'hooks' (Opacus) for this model"
        )
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        raise NotImplementedError(f"per-sample gradients: embedding '{name}' uses max_norm, scale_grad_by_freq or sparse")
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise NotImplementedError(f"per-sample gradients: conv '{name}' uses padding_mode {module.padding_mode!r}")
