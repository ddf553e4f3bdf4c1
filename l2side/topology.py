"""`l2side.topology()`: the L2 layout of a GPU, measured by latency, cached per GPU UUID on disk."""
from __future__ import annotations

import dataclasses
import threading

from . import _native, sides
from .jit import KERNELS_DIR, cache_dir, compile as jit_compile

_ready = False
_ready_lock = threading.Lock()


def prepare_native() -> None:
    """Hands the native core what it needs before its first probe: the probe PTX and the cache folder."""
    global _ready
    if _ready:
        return
    with _ready_lock:
        if _ready:
            return
        ok, why = _native.driver_status()
        if not ok:
            raise RuntimeError(f"l2side needs a CUDA GPU and its driver: {why}")
        source = (KERNELS_DIR / "l2_probe.cu").read_text()
        # PTX for the oldest target nvcc supports: the driver finishes it for whatever GPU loads it.
        ptx = jit_compile(source, name="l2_probe", arch="sm_75", output="ptx")
        _native.set_cache_dir(str(cache_dir()))
        _native.set_probe_ptx(ptx.decode())
        _ready = True


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where a GPU's L2 sides are. SM ids are the hardware %smid values; the lowest one is side 0."""
    device: int
    device_name: str
    uuid: str
    num_sms: int
    sm_side: tuple          # indexed by %smid; -1 where no SM has that id
    sms_per_side: tuple     # (side 0, side 1)
    hash_mask: int          # in-page address bits whose parity flips the side
    split: bool             # False: no split found; everything is side 0
    near_cycles: float
    far_cycles: float
    linearity: float        # share of random in-page offsets whose side the mask predicted
    probe_ms: float
    from_cache: bool

    @property
    def side_mask(self) -> int:
        """The kernels' constant: side(addr) = popcount(addr & side_mask) & 1 (0 when there is no split)."""
        return sides.side_mask(self.hash_mask, self.split)

    def side_of_address(self, address: int) -> int:
        return sides.side_of_address(address, self.side_mask)

    def __str__(self) -> str:
        if not self.split:
            return (f"{self.device_name} (device {self.device}): {self.num_sms} SMs, no L2 split found "
                    f"(L2 hit ~{self.near_cycles:.0f} cycles)")
        return (f"{self.device_name} (device {self.device}): {self.num_sms} SMs, "
                f"{self.sms_per_side[0]}/{self.sms_per_side[1]} per side, hash mask {self.hash_mask:#x}, "
                f"near {self.near_cycles:.0f} / far {self.far_cycles:.0f} cycles, "
                f"probe {self.probe_ms:.1f} ms{' (cached)' if self.from_cache else ''}")


_topologies: dict = {}


def device_index(device=None) -> int:
    """A CUDA device index from None / int / 'cuda:N' / torch.device, checked against the device count,
    without initialising torch's CUDA state (so it is safe before l2side.enable())."""
    import torch
    if device is None:
        index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    elif isinstance(device, int):
        index = device
    else:
        d = torch.device(device)
        if d.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {d}")
        index = d.index if d.index is not None else (torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    prepare_native()
    count = _native.device_count()
    if not 0 <= index < count:
        raise ValueError(f"device must name one of the {count} CUDA devices, got index {index}")
    return index


def topology(device=None, *, reprobe: bool = False) -> Topology:
    """The L2 topology of `device` (probed once per GPU and cached on disk by UUID)."""
    index = device_index(device)
    if reprobe or index not in _topologies:
        d = _native.topology(index, reprobe)
        _topologies[index] = Topology(
            device=index, device_name=d["name"], uuid=d["uuid"], num_sms=d["num_sms"],
            sm_side=tuple(d["sm_side"]), sms_per_side=tuple(d["sms_per_side"]), hash_mask=d["hash_mask"],
            split=d["split"], near_cycles=d["near_cycles"], far_cycles=d["far_cycles"],
            linearity=d["linearity"], probe_ms=d["probe_ms"], from_cache=d["from_cache"])
    return _topologies[index]
