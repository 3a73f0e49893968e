"""Calibration statistics of a linear layer's input, gathered by hooks in bounded memory.

Per input channel the running min and max (smoothing needs the absmax, the GELU-shifted layers the
max of ``x + shift``), a uniform sample of at most ``max_rows`` input rows (the smoothing search and
low-rank iterations measure output error on it), and optionally ``Σ xᵀx`` for GPTQ over every row.
GPTQ fits its rounding to the Hessian's rows, so only rows it has not seen tell whether it helped: the
quantizer holds some sampled rows out and takes their part back out of the sum (:meth:`held_out`).
Memory is ``O(max_rows·K + K²)`` however many tokens pass, so a 12B model's activations never pile up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import CalibrationError


class InputStats:
    def __init__(
        self,
        name: str,
        in_features: int,
        max_rows: int = 512,
        hessian: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        self.name, self.in_features, self.max_rows = name, in_features, max_rows
        self.device = torch.device(device)
        self.minimum = torch.full((in_features,), float("inf"), device=self.device)
        self.maximum = torch.full((in_features,), float("-inf"), device=self.device)
        self.rows = torch.empty((0, in_features), device=self.device)
        self._keys = torch.empty((0,), device=self.device)
        self.hessian = torch.zeros((in_features, in_features), device=self.device) if hessian else None
        # Σ x and the number of rows, over the Hessian's rows (every row)
        self.total = torch.zeros((in_features,), device=self.device)
        self.hessian_rows = 0
        self.count = 0
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise CalibrationError(
                f"{self.name}: input has {x.shape[-1]} channels, the layer expects {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(self.device, torch.float32)
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"{self.name}: NaN or Inf in the layer's input during calibration; "
                "the model or its calibration inputs produce non-finite activations"
            )
        self.minimum = torch.minimum(self.minimum, x.amin(dim=0))
        self.maximum = torch.maximum(self.maximum, x.amax(dim=0))
        self.count += x.shape[0]
        self._sample(x)
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)
            self.total += x.sum(dim=0)
            self.hessian_rows += x.shape[0]

    def _sample(self, x: torch.Tensor) -> None:
        """Offer ``x`` to the sample."""
        # Priority sampling: every row gets a uniform random key and the max_rows largest keys are
        # kept, which is a uniform sample without replacement of all rows seen so far.
        keys = torch.rand(x.shape[0], generator=self._generator, device=self.device)
        if self._keys.numel() >= self.max_rows:
            keep = keys > self._keys.min()
            x, keys = x[keep], keys[keep]
        keys = torch.cat([self._keys, keys])
        rows = torch.cat([self.rows, x])
        if keys.numel() > self.max_rows:
            top = torch.topk(keys, self.max_rows).indices
            keys, rows = keys[top], rows[top]
        self._keys, self.rows = keys, rows

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.maximum.abs(), self.minimum.abs())

    def shifted_absmax(self, shift: float) -> torch.Tensor:
        return torch.maximum((self.maximum + shift).abs(), (self.minimum + shift).abs())

    def shifted_hessian(self, shift: float, held_out: int = 0) -> torch.Tensor | None:
        """Σ (x + shift)(x + shift)ᵀ over the Hessian's rows less the first ``held_out`` sampled rows, from
        Σ xxᵀ, Σ x and their count. A new tensor: K is 12288 for FLUX.1's MLP down projections, so the
        steps run in place on one copy."""
        if self.hessian is None:
            return None
        out = self.hessian.clone()
        if shift:
            out.add_(self.total[:, None], alpha=shift)
            out.add_(self.total[None, :], alpha=shift)
            out.add_(shift * shift * self.hessian_rows)
        if held_out:
            held = self.rows[:held_out] + shift
            out.addmm_(held.T, held, alpha=-1.0)
        return out

    def held_out(self, minimum: int) -> int:
        """How many sampled rows to hold out of the Hessian to check GPTQ on: half the sample, fewer if the
        Hessian would otherwise keep fewer rows than input channels; 0 when that leaves under ``minimum``."""
        if self.hessian is None:
            return 0
        held = min(self.rows.shape[0] // 2, self.hessian_rows - self.in_features)
        return held if held >= minimum else 0

    def require_data(self) -> None:
        if self.count == 0:
            raise CalibrationError(
                f"{self.name}: the calibration run never reached this layer, so it has no statistics"
            )

    def narrow(self, start: int, length: int, name: str | None = None) -> InputStats:
        """The statistics of input channels ``start:start+length`` (for layers split along K)."""
        part = InputStats.__new__(InputStats)
        part.name = name or f"{self.name}[{start}:{start + length}]"
        part.in_features, part.max_rows, part.device = length, self.max_rows, self.device
        part.minimum = self.minimum[start : start + length]
        part.maximum = self.maximum[start : start + length]
        part.rows = self.rows[:, start : start + length]
        part._keys = self._keys
        part.total = self.total[start : start + length]
        part.hessian = None
        if self.hessian is not None:
            part.hessian = self.hessian[start : start + length, start : start + length]
        part.count, part.hessian_rows = self.count, self.hessian_rows
        part._generator = self._generator
        return part


@contextlib.contextmanager
def record_inputs(layers: dict[str, nn.Module], stats: dict[str, InputStats]) -> Iterator[None]:
    """Feed every call's first positional input of ``layers[name]`` into ``stats[name]``."""
    handles = []
    for name, module in layers.items():
        target = stats[name]
        handles.append(module.register_forward_pre_hook(lambda _m, args, t=target: t.update(args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
