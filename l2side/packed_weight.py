"""`PackedWeight`: a side-aware packed FP8 weight as a torch.nn.Module, so a model can hold one (issue 4).

Its state_dict is the unpacked form — `weight` float8_e4m3fn [N, K] and `weight_scales` float32
[ceil(N/128), ceil(K/128)] — so checkpoints are plain tensors (torch.load(weights_only=True) reads them, and a
model that keeps its weights unpacked loads them too). On a CUDA device the module holds only the packed copy
(a PackedB: no second copy of the weight), on the CPU the plain tensors; .to() / .cuda() / .cpu() move it and
pack again on arrival at a GPU (dtype conversions such as .half() leave it as it is: it stays FP8).
forward(a, a_scales, out=None, side_mode="near") is l2side.gemm with the packed weight.
"""
from __future__ import annotations

import torch

from . import packed_b


class PackedWeight(torch.nn.Module):
    def __init__(self, weight, weight_scales, *, block_n: int = 128, layout: str = "auto"):
        super().__init__()
        self.block_n, self.layout = block_n, layout
        self.packed = None      # PackedB on a CUDA device
        self._plain = None      # (weight, weight_scales) on the CPU
        self._hold(weight, weight_scales)

    def _hold(self, weight, weight_scales):
        """Keeps the weight where it is: packed on a GPU, plain on the CPU (pack_b's checks either way)."""
        if isinstance(weight, torch.Tensor) and weight.is_cuda:
            self.packed, self._plain = packed_b.pack_b(weight, weight_scales, block_n=self.block_n,
                                                       layout=self.layout), None
            self.block_n = self.packed.block_n
        else:
            self.block_n = packed_b._check(weight, weight_scales, self.block_n, self.layout, need_cuda=False)
            if weight_scales.device != weight.device:
                raise ValueError(f"PackedWeight: weight_scales must be on weight's device {weight.device}, "
                                 f"got {weight_scales.device}")
            self.packed, self._plain = None, (weight.contiguous(), weight_scales.contiguous())

    @property
    def device(self) -> torch.device:
        return self.packed.device if self.packed is not None else self._plain[0].device

    @property
    def shape(self) -> tuple:
        return self.packed.shape if self.packed is not None else tuple(self._plain[0].shape)

    def unpacked(self) -> tuple:
        """(weight, weight_scales) where the module is (exact: unpacking a packed weight gives back its bytes)."""
        return self.packed.unpack() if self.packed is not None else self._plain

    def forward(self, a, a_scales, out=None, *, side_mode: str = "near"):
        if self.packed is None:
            raise ValueError(f"PackedWeight: the weight is on {self.device}; the GEMM runs on a CUDA device "
                             "(move the module with .cuda() or .to(device) first)")
        from .fp8_gemm import gemm
        return gemm(a, a_scales, self.packed, out=out, side_mode=side_mode)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .cpu() / .half() ... : where fn sends a tensor of ours is where the weight goes
        super()._apply(fn, recurse)
        dest = fn(torch.empty(0, device=self.device)).device
        if dest != self.device:
            weight, scales = self.unpacked()
            self._hold(weight.to(dest), scales.to(dest))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight, scales = self.unpacked()
        destination[prefix + "weight"] = weight
        destination[prefix + "weight_scales"] = scales

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = (prefix + "weight", prefix + "weight_scales")
        missing = [key for key in keys if key not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        weight, scales = state_dict[keys[0]], state_dict[keys[1]]
        if tuple(weight.shape) != self.shape:
            error_msgs.append(f"size mismatch for {keys[0]}: copying a param with shape {tuple(weight.shape)} "
                              f"from checkpoint, the shape in current model is {self.shape}.")
            return
        try:
            self._hold(weight.to(self.device), scales.to(device=self.device))
        except ValueError as e:
            error_msgs.append(f"{prefix}: {e}")

    def extra_repr(self) -> str:
        n, k = self.shape
        where = f"packed on {self.device} ({self.packed.kind})" if self.packed is not None else f"on {self.device}"
        return f"n={n}, k={k}, block_n={self.block_n}, {where}"
