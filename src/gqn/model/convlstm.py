"""ConvLSTM core whose gate convolution is split by named input group.

The gates are ``conv(cat(inputs..., h))``. Keeping one weight tensor per input group lets the generator
compute the contribution of step-invariant inputs (query pose, scene representation, query image) once
per forward pass instead of once per DRAW step, and convolve broadcast codes in closed form. The
straightforward concatenate-then-convolve computation stays available as :meth:`ConvLSTMCell.forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def broadcast_conv(code: torch.Tensor, weight: torch.Tensor, size: int, dilation: int = 1) -> torch.Tensor:
    """Exact ``conv2d(code broadcast over size x size, weight, padding=dilation*(k//2), dilation=dilation)``
    without the convolution.

    code ``[B, C]``, weight ``[O, C, k, k]`` -> ``[B, O, size, size]``. Each output pixel sums the kernel
    offsets that fall inside the zero-padded grid, so the result is one small matrix product per offset
    (``[B, O, k, k]``) followed by a separable border mask.
    """
    k = weight.shape[-1]
    pad = dilation * (k // 2)
    per_offset = torch.einsum("bc,ocyx->boyx", code, weight)  # [B, O, k, k]
    pos = torch.arange(size, device=code.device)
    offs = torch.arange(k, device=code.device) * dilation
    src = pos[None, :] + offs[:, None] - pad  # [k, size] input row read by offset y at output row i
    valid = ((src >= 0) & (src < size)).to(code.dtype)  # [k, size]
    return torch.einsum("boyx,yi,xj->boij", per_offset, valid, valid)


class ConvLSTMCell(nn.Module):
    """A ConvLSTM cell with inputs given as a dict of named groups (see module docstring).

    ``kernel_sizes`` gives some groups (``"h"`` among them) their own kernel instead of ``kernel_size``; a
    convolution over several groups pads the smaller kernels with zeros (centred), so it stays exact.
    ``dilation`` spaces every kernel's taps (padding ``dilation * (k // 2)``: the grid keeps its size).
    """

    def __init__(self, input_channels: dict[str, int], hidden_channels: int, kernel_size: int = 5,
                 kernel_sizes: dict[str, int] | None = None, dilation: int = 1):
        super().__init__()
        groups = {**dict(input_channels), "h": hidden_channels}
        sizes = {name: kernel_size for name in groups}
        for name, k in (kernel_sizes or {}).items():
            if name in sizes:  # a group this cell does not take (e.g. no attention read) is ignored
                sizes[name] = k
        for k in set(sizes.values()):
            if k % 2 != 1 or k < 1:
                raise ValueError(f"ConvLSTM kernel sizes must be odd and >= 1, got {k}")
        if dilation < 1:
            raise ValueError(f"ConvLSTM dilation must be >= 1, got {dilation}")
        self.input_channels = dict(input_channels)
        self.hidden_channels = hidden_channels
        self.dilation = dilation  # (each group's kernel is its weight's last dimension)
        gates = 4 * hidden_channels
        self.weight = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(gates, c, sizes[name], sizes[name])) for name, c in groups.items()}
        )
        self.bias = nn.Parameter(torch.zeros(gates))
        fan_in = sum(c * sizes[name] ** 2 for name, c in groups.items())
        bound = 1.0 / math.sqrt(fan_in)  # as nn.Conv2d for the concatenated input
        for w in self.weight.values():
            nn.init.uniform_(w, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def group_names(self) -> list[str]:
        return [*self.input_channels, "h"]

    def conv(self, x: torch.Tensor, names: list[str], bias: bool = False) -> torch.Tensor:
        """Gate pre-activations from the input groups ``names`` (already concatenated in ``x``)."""
        k = max(self.weight[n].shape[-1] for n in names)
        ws = [self._padded(n, k) for n in names]
        w = torch.cat(ws, dim=1) if len(ws) > 1 else ws[0]
        return F.conv2d(x, w, self.bias if bias else None, padding=self.dilation * (k // 2), dilation=self.dilation)

    def _padded(self, name: str, k: int) -> torch.Tensor:
        """Group ``name``'s weight, its kernel zero-padded (centred) to k x k."""
        w = self.weight[name]
        p = (k - w.shape[-1]) // 2
        return F.pad(w, (p, p, p, p)) if p else w

    def conv_broadcast(self, code: torch.Tensor, name: str, size: int) -> torch.Tensor:
        """Gate pre-activations of a code ``[B, C]`` that is constant over the grid (closed form)."""
        return broadcast_conv(code, self.weight[name], size, self.dilation)

    def update(self, gates: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSTM state update from gate pre-activations ``[B, 4h, s, s]`` (bias not yet added)."""
        gates = gates + self.bias[None, :, None, None]
        i, f, o, g = gates.chunk(4, dim=1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        return hidden, cell

    def forward(
        self, inputs: dict[str, torch.Tensor], state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference step: concatenate every input group and the hidden state, one convolution."""
        hidden, cell = state
        x = torch.cat([inputs[n] for n in self.input_channels] + [hidden], dim=1)
        return self.update(self.conv(x, self.group_names), cell)
