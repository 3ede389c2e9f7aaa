"""The GPU's SM clock, energy counter and clock-limit reasons through NVML, for the benchmark.

Hopper cards run sustained MoE steps at their power limit, where the clock an implementation sustains is part of
its time (NOTES, sessions 19, 22 and 23): the benchmark reports each implementation's clock and power beside it.
The driver's libnvidia-ml is loaded with ctypes (no Python package needed); where it cannot be (no driver, a
GPU NVML does not list, an older driver without a call), the meter is inactive and its readings are None.
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Optional

import torch

_CLOCK_SM = 1  # nvmlClockType_t NVML_CLOCK_SM
# nvmlClocksEventReasons: the software power cap and the hardware / thermal slowdowns.
POWER_CAP = 0x4
SLOWDOWNS = 0x8 | 0x20 | 0x40 | 0x80


class GpuMeter:
    def __init__(self, device: torch.device):
        self._calls: dict = {}
        self._handle = None
        if device.type != "cuda":
            return
        try:
            nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if nvml.nvmlInit_v2() != 0:
                return
            # The CUDA device's own card, found by its PCI address (CUDA_VISIBLE_DEVICES may renumber the cards).
            p = torch.cuda.get_device_properties(device)
            bus_id = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0".encode()
            by_bus = nvml.nvmlDeviceGetHandleByPciBusId_v2
            by_bus.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
            handle = ctypes.c_void_p()
            if by_bus(bus_id, ctypes.byref(handle)) != 0:
                return
        except (OSError, AttributeError):  # no library, or a symbol / device property this version lacks
            return
        # Each reading: (the first of its entry points this driver exports, its value type, leading arguments).
        for key, names, ctype, args in (
                ("sm_clock", ("nvmlDeviceGetClockInfo",), ctypes.c_uint, (_CLOCK_SM,)),
                ("energy", ("nvmlDeviceGetTotalEnergyConsumption",), ctypes.c_ulonglong, ()),
                ("reasons", ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
                 ctypes.c_ulonglong, ())):
            fn = next((getattr(nvml, n) for n in names if hasattr(nvml, n)), None)
            if fn is not None:
                fn.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * len(args) + [ctypes.POINTER(ctype)]
                self._calls[key] = (fn, ctype, args)
        self._handle = handle

    @property
    def active(self) -> bool:
        return self._handle is not None

    def _read(self, key: str):
        if key not in self._calls:
            return None
        fn, ctype, args = self._calls[key]
        value = ctype()
        try:
            ok = fn(self._handle, *args, ctypes.byref(value)) == 0
        except ctypes.ArgumentError:
            ok = False
        return value.value if ok else None

    def sm_clock_mhz(self) -> Optional[int]:
        return self._read("sm_clock")

    def energy_mj(self) -> Optional[int]:
        """The card's energy counter in millijoules (since the driver loaded)."""
        return self._read("energy")

    def clock_limit_reasons(self) -> Optional[int]:
        return self._read("reasons")


class Window:
    """Readings over a stretch of steps, taken by a thread of their own from open() to summary(): the energy
    counter, the SM clock and the clock-limit reasons, over and over. summary() gives the median SM clock, the
    mean power, the energy per step and the share of samples at the power cap, or {} where nothing was read.

    A thread, because a read can take milliseconds (an H200's energy counter: 3.5 ms, session 23): read between
    the steps, it would leave the card idle and cool and no longer in the sustained state being timed. The
    thread waits in the library call without the GIL, so the loop launching the steps goes on meanwhile.

    The driver refreshes the energy counter only every ~100 ms (H200), so its difference over a window of a few
    hundred milliseconds, divided by the host clock, is off by up to a refresh period at each end (session 23's
    first H200 run read 913 W under a 700 W limit that way). The mean power is taken between the first and the
    last refresh seen inside the window instead: the energy between them over the host time between the reads
    that first saw them."""

    MIN_SPAN_S = 0.05  # a mean power needs refreshes at least this far apart
    PERIOD_S = 0.002   # the least time between two rounds of reads (where reads are fast)

    def __init__(self, meter: GpuMeter):
        self.meter = meter
        self.start = None
        self.clocks: list = []
        self.reasons: list = []
        self.refreshes: list = []  # (host time, counter) at each read that saw the counter change
        self._stop = threading.Event()
        self._thread = None

    def open(self, steps: int):
        if self.start is not None:
            return
        self.start = (time.perf_counter(), steps)
        self._thread = threading.Thread(target=self._sample, name="fusedmoe-gpu-meter", daemon=True)
        self._thread.start()

    def _sample(self):
        last = self.meter.energy_mj()
        while True:
            energy = self.meter.energy_mj()
            now = time.perf_counter()
            pause = self.PERIOD_S
            if energy is not None and last is not None and energy != last:
                self.refreshes.append((now, energy))
                if len(self.refreshes) >= 2:
                    # Refreshes come at a steady period: sleep through most of it and poll only near the next
                    # one, so the window's reads (each a driver round trip) stay few.
                    pause = max(pause, 0.7 * (now - self.refreshes[-2][0]))
            last = energy
            mhz, why = self.meter.sm_clock_mhz(), self.meter.clock_limit_reasons()
            if mhz is not None:
                self.clocks.append(mhz)
            if why is not None:
                self.reasons.append(why)
            if self._stop.wait(pause):
                return

    def close(self):
        """Stops the reading thread (summary() does; call it where the steps end otherwise, e.g. on an error)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self, steps: int) -> dict:
        if self.start is None:
            return {}
        t1 = time.perf_counter()
        self.close()
        t0, steps0 = self.start
        out = {}
        if self.clocks:
            out["sm_mhz"] = sorted(self.clocks)[len(self.clocks) // 2]
        if self.reasons:
            out["power_capped"] = sum(bool(r & POWER_CAP) for r in self.reasons) / len(self.reasons)
            out["slowdown"] = sum(bool(r & SLOWDOWNS) for r in self.reasons) / len(self.reasons)
        if len(self.refreshes) >= 2 and steps > steps0:
            (ta, ea), (tb, eb) = self.refreshes[0], self.refreshes[-1]
            if tb - ta >= self.MIN_SPAN_S:
                watts = (eb - ea) / 1e3 / (tb - ta)
                out.update(watts=watts, joules_per_step=watts * (t1 - t0) / (steps - steps0), window_s=t1 - t0,
                           energy_refreshes=len(self.refreshes))
        return out
