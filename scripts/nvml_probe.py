"""How the driver's energy counter and power reading behave on this card, for the bench's meter (gpu_meter.py):
polls nvmlDeviceGetTotalEnergyConsumption as fast as it can for a few seconds while a matmul loop keeps the card
busy, and prints the refresh period (host time between changes of the counter), the cost of one read, and the
mean power from the counter's refreshes beside nvmlDeviceGetPowerUsage.
    python scripts/nvml_probe.py [seconds]"""
import statistics
import sys
import time

import torch

from fusedmoe.gpu_meter import GpuMeter


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    dev = torch.device("cuda")
    meter = GpuMeter(dev)
    if not meter.active:
        print("NVML: inactive on this machine")
        return
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(20):  # warm the card up to its sustained state
        a @ b
    torch.cuda.synchronize()
    import ctypes
    nvml = ctypes.CDLL("libnvidia-ml.so.1")
    power = nvml.nvmlDeviceGetPowerUsage
    power.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
    mw = ctypes.c_uint()
    reads, costs, changes, powers = 0, [], [], []
    last = meter.energy_mj()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if torch.cuda.current_stream().query():  # keep ~10 matmuls queued
            for _ in range(10):
                a @ b
        t0 = time.perf_counter()
        e = meter.energy_mj()
        t1 = time.perf_counter()
        costs.append(t1 - t0)
        reads += 1
        if e != last:
            changes.append((t1, e))
            if power(meter._handle, ctypes.byref(mw)) == 0:
                powers.append(mw.value / 1e3)
            last = e
    torch.cuda.synchronize()
    for name, read in (("SM clock", meter.sm_clock_mhz), ("clock-limit reasons", meter.clock_limit_reasons),
                       ("energy counter", meter.energy_mj)):
        for busy in (False, True):
            if busy:
                for _ in range(10):
                    a @ b
            t = []
            for _ in range(20):
                t0 = time.perf_counter()
                read()
                t.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            print(f"one read of the {name}: {statistics.median(t) * 1e6:.1f} us (median of 20, "
                  f"{'card busy' if busy else 'card idle'})")
    gaps = [(b[0] - a[0]) * 1e3 for a, b in zip(changes, changes[1:])]
    print(f"energy counter: {reads} reads, one read {statistics.median(costs) * 1e6:.1f} us (median), "
          f"{len(changes)} refreshes")
    if len(gaps) >= 2:
        q = statistics.quantiles(gaps, n=10)
        print(f"refresh period ms: median {statistics.median(gaps):.1f}, p10 {q[0]:.1f}, p90 {q[-1]:.1f}, "
              f"min {min(gaps):.1f}, max {max(gaps):.1f}")
        (ta, ea), (tb, eb) = changes[0], changes[-1]
        print(f"mean power between refreshes {(eb - ea) / 1e3 / (tb - ta):.0f} W; nvmlDeviceGetPowerUsage at the "
              f"refreshes: median {statistics.median(powers):.0f} W (min {min(powers):.0f}, max {max(powers):.0f})")
        steps = [(b[1] - a[1]) / 1e3 / ((b[0] - a[0])) for a, b in zip(changes, changes[1:])]
        print(f"power per refresh interval W: median {statistics.median(steps):.0f}, min {min(steps):.0f}, "
              f"max {max(steps):.0f}")


if __name__ == "__main__":
    main()
