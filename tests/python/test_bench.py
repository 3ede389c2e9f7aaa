"""The benchmark command's quick mode: a table, valid JSON with the expected keys, and a PNG."""
import json
import subprocess
import sys


def test_bench_quick_mode_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "fusedmoe.bench", "--quick", "--device", "cpu", "--modes", "fwd",
                           "fwdbwd", "--tokens", "8", "32", "--impls", "fusedmoe", "torch_grouped_mm", "hf",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[fwd]" in proc.stdout and "[fwdbwd]" in proc.stdout and "fusedmoe" in proc.stdout
    data = json.loads((out / "bench.json").read_text())
    for key in ("machine", "shape", "results", "checks", "skipped", "flops_formula", "repeats"):
        assert key in data
    assert data["machine"]["torch"] and data["machine"]["fusedmoe"]
    assert data["checks"]["fusedmoe"]["ok"] and data["checks"]["fusedmoe"]["rel_err"] < 2e-2
    timed = [r for r in data["results"] if "ms" in r]
    impls = {r["impl"] for r in timed}
    assert {"fusedmoe", "torch_grouped_mm", "hf", "dense_equivalent"} <= impls
    assert len(timed) == 2 * 2 * 4
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in timed)
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_table_lists_peak_memory_where_measured(capsys):
    from fusedmoe import bench

    row = dict(mode="fwdbwd", tokens=2048, tflops=1.0, max_over_mean_load=1.0)
    rows = [dict(row, impl="fusedmoe", ms=1.0, peak_extra_mib=1330.4),
            dict(row, impl="torch_grouped_mm", ms=2.0, peak_extra_mib=1369.0),
            dict(row, impl="dense_equivalent", ms=0.5)]  # (a row without a peak: a dash)
    result = dict(results=rows, skipped={}, shape={}, dtype="bf16", skew=0.0, flops_formula="",
                  machine=dict(gpu="test card", torch="x", transformers="y"))
    bench.print_table(result)
    out = capsys.readouterr().out
    peak_line = out.split("peak MiB above the inputs")[1].splitlines()[1]
    assert peak_line.split() == ["2048", "1330", "1369", "-"]
    # CPU runs measure no peak: no peak table.
    for r in rows:
        r.pop("peak_extra_mib", None)
    bench.print_table(result)
    assert "peak MiB" not in capsys.readouterr().out


def test_timer_warms_up_for_steps_and_time_then_takes_the_median():
    import time

    import torch
    from fusedmoe import bench

    calls = []

    def step():
        calls.append(time.perf_counter())
        time.sleep(0.002)

    # At least 40 ms of 2 ms steps: about 20 warm-up steps, more than the 3 asked for, then 5 timed ones.
    ms = bench.Timer(torch.device("cpu"), warmup_ms=40.0)(step, 3, 5)
    warm = len(calls) - 5
    assert warm >= 3 and calls[warm] - calls[0] >= 0.039  # the first timed step starts after the 40 ms
    assert 1.5 <= ms < 50
    # Without a warm-up time the step count alone decides.
    calls.clear()
    bench.Timer(torch.device("cpu"))(step, 4, 2)
    assert len(calls) == 6


class FakeMeter:
    """A card at 1500 MHz under its power cap that draws 2000 W (its energy counter runs with the host clock)."""
    active = True

    def sm_clock_mhz(self):
        return 1500

    def clock_limit_reasons(self):
        return 0x4

    def energy_mj(self):
        import time
        return int(time.perf_counter() * 2e6)


def test_timer_reports_clock_power_and_energy_over_the_sustained_loop():
    import time

    import torch
    from fusedmoe import bench

    def step():
        time.sleep(0.002)

    timer = bench.Timer(torch.device("cpu"), warmup_ms=150.0, meter=FakeMeter())
    t_start = time.perf_counter()
    ms = timer(step, 3, 5)
    got = timer.last
    assert 2.0 <= got["ms_p10"] <= ms <= got["ms_p90"]  # the timed steps' spread around their median
    assert got["sm_mhz"] == 1500 and got["power_capped"] == 1.0 and got["slowdown"] == 0.0
    assert 1500 <= got["watts"] <= 2500  # the fake's 2000 W, read through the host clock
    assert 0.010 <= got["window_s"] < time.perf_counter() - t_start  # the timed steps and part of the warm-up
    assert 0.9 * 4.0 <= got["joules_per_step"] <= 5 * 4.0  # 2000 W over steps of at least 2 ms: 4 J or more
    # Without a meter (or with an inactive one): no readings.
    assert bench.Timer(torch.device("cpu"), meter=None).last == {}
    inactive = bench.Timer(torch.device("cpu"), meter=bench.GpuMeter(torch.device("cpu")))
    inactive(step, 1, 1)
    assert inactive.last == {}


class CoarseMeter(FakeMeter):
    """The fake card's 2000 W, but its energy counter moves only every `period` seconds (as NVML's does)."""

    def __init__(self, period):
        self.period = period

    def energy_mj(self):
        import time
        t = time.perf_counter()
        return int((t - t % self.period) * 2e6)


def test_timer_takes_power_between_energy_counter_refreshes():
    import time

    import torch
    from fusedmoe import bench

    def step():
        time.sleep(0.002)

    # A 25 ms refresh against a ~210 ms window: the counter's raw difference over the host clock would be off by
    # up to 2 x 25 / 210; between refreshes it is off by about a step. (A ~110 ms window failed one run in four on a
    # loaded 2-core machine: a reading thread held off the CPU for tens of ms saw refreshes under 50 ms apart.)
    timer = bench.Timer(torch.device("cpu"), warmup_ms=400.0, meter=CoarseMeter(0.025))
    timer(step, 3, 5)
    got = timer.last
    assert got["energy_refreshes"] >= 3
    assert 0.85 * 2000 <= got["watts"] <= 1.15 * 2000
    assert 0.85 * 4.0 <= got["joules_per_step"] <= 12.0  # ~2000 W over steps of 2 ms and a little more
    # A counter that does not refresh twice inside the window gives no power (the clock is still read).
    timer = bench.Timer(torch.device("cpu"), warmup_ms=40.0, meter=CoarseMeter(10.0))
    timer(step, 3, 5)
    assert "watts" not in timer.last and "joules_per_step" not in timer.last and timer.last["sm_mhz"] == 1500


class SlowMeter(FakeMeter):
    """Each energy read takes 20 ms (an H200's takes 3.5 ms), waiting without the GIL as a ctypes call does."""

    def energy_mj(self):
        import time
        time.sleep(0.02)
        return super().energy_mj()


def test_timer_reads_the_card_beside_the_steps_not_between_them():
    import time

    import torch
    from fusedmoe import bench

    def step():
        time.sleep(0.002)

    timer = bench.Timer(torch.device("cpu"), warmup_ms=200.0, meter=SlowMeter())
    ms = timer(step, 3, 10)
    assert ms < 10.0  # a step's 2 ms, not 2 + 20
    assert 0.85 * 2000 <= timer.last["watts"] <= 1.15 * 2000


def test_timer_stops_reading_the_card_when_a_step_raises():
    import threading
    import time

    import pytest
    import torch
    from fusedmoe import bench

    def reading():
        return any(t.name == "fusedmoe-gpu-meter" for t in threading.enumerate())

    seen = []

    def step():  # the window opens after 20 ms (at the 16th step); the 22nd step fails
        time.sleep(0.002)
        seen.append(reading())
        if len(seen) == 22:
            raise RuntimeError("out of memory")

    timer = bench.Timer(torch.device("cpu"), warmup_ms=40.0, meter=FakeMeter())
    with pytest.raises(RuntimeError):
        timer(step, 3, 5)
    assert seen[-1] and not reading()


def test_timer_times_steps_back_to_back_as_well():
    import time

    import torch
    from fusedmoe import bench

    calls = []

    def step():
        calls.append(1)
        time.sleep(0.002)

    timer = bench.Timer(torch.device("cpu"), back_to_back=True)
    timer(step, 3, 5)
    assert len(calls) == 3 + 5 + 5  # the warm-up, the synchronised steps, the back-to-back ones
    assert 2.0 <= timer.last["ms_back_to_back"] < 10.0
    plain = bench.Timer(torch.device("cpu"))
    plain(step, 1, 2)
    assert "ms_back_to_back" not in plain.last


def test_gpu_meter_is_inactive_off_the_gpu():
    import torch
    from fusedmoe.gpu_meter import GpuMeter

    m = GpuMeter(torch.device("cpu"))
    assert not m.active
    assert m.sm_clock_mhz() is None and m.energy_mj() is None and m.clock_limit_reasons() is None


def test_table_lists_clock_and_power_where_measured(capsys):
    from fusedmoe import bench

    row = dict(mode="fwd", tokens=4096, tflops=1.0, max_over_mean_load=1.0)
    rows = [dict(row, impl="fusedmoe", ms=1.0, sm_mhz=1575, watts=563.4, joules_per_step=0.512, power_capped=0.9,
                 ms_back_to_back=0.875),
            dict(row, impl="torch_grouped_mm", ms=2.0, sm_mhz=1710, power_capped=0.1),  # no energy counter
            dict(row, impl="dense_equivalent", ms=0.5)]
    result = dict(results=rows, skipped={}, shape={}, dtype="bf16", skew=0.0, flops_formula="",
                  machine=dict(gpu="test card", torch="x", transformers="y"))
    bench.print_table(result)
    out = capsys.readouterr().out
    line = out.split("SM clock, power, energy per step")[1].splitlines()[1]
    assert line.split() == ["4096", "1575", "MHz", "563", "W", "0.51", "J*", "1710", "MHz", "-"]
    line = out.split("ms per step back to back")[1].splitlines()[1]
    assert line.split() == ["4096", "0.875", "-", "-"]


def test_gpu_meter_reads_the_card_at_its_pci_address_through_nvml(monkeypatch):
    """GpuMeter against a stand-in for libnvidia-ml (this machine may have no driver): the card is looked up by
    the CUDA device's PCI address, each reading goes through its entry point, the older name of the clock-limit
    reasons call serves where the newer is missing, and a failing call reads None."""
    import ctypes
    import types

    import torch
    from fusedmoe import gpu_meter

    calls = []

    class FakeNvml:
        def nvmlInit_v2(self):
            return 0

    lib = FakeNvml()

    def entry(name, body):
        def fn(*args):
            calls.append(name)
            return body(*args)
        setattr(lib, name, fn)

    def by_bus(bus_id, handle_ref):
        if bus_id != b"00000000:1B:00.0":
            return 1
        handle_ref._obj.value = 0xCAFE
        return 0

    def put(value):
        def body(handle, *rest):
            assert handle.value == 0xCAFE
            rest[-1]._obj.value = value
            return 0
        return body

    entry("nvmlDeviceGetHandleByPciBusId_v2", by_bus)
    entry("nvmlDeviceGetClockInfo", lambda handle, clock, ref: put(1755)(handle, ref) if clock == 1 else 2)
    entry("nvmlDeviceGetTotalEnergyConsumption", put(123456789))
    entry("nvmlDeviceGetCurrentClocksThrottleReasons", put(0x4))  # only the pre-535 name
    monkeypatch.setattr(gpu_meter.ctypes, "CDLL", lambda name: lib)
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    m = gpu_meter.GpuMeter(torch.device("cuda", 0))
    assert m.active
    assert (m.sm_clock_mhz(), m.energy_mj(), m.clock_limit_reasons()) == (1755, 123456789, 0x4)
    assert lib.nvmlDeviceGetClockInfo.argtypes[1] is ctypes.c_int
    # A card NVML does not list at that address: inactive, nothing read.
    props.pci_bus_id = 0x1C
    other = gpu_meter.GpuMeter(torch.device("cuda", 0))
    assert not other.active and other.sm_clock_mhz() is None
    # A failing call reads None.
    entry("nvmlDeviceGetTotalEnergyConsumption", lambda handle, ref: 3)
    props.pci_bus_id = 0x1B
    assert gpu_meter.GpuMeter(torch.device("cuda", 0)).energy_mj() is None
