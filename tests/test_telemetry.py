"""GPU telemetry: the real "off" path on this (driverless) machine, and the enabled path with a
fake pynvml module (2 GPUs, gpu1 a MIG slice whose power query raises NotSupported)."""
import logging
import sys
import types
from types import SimpleNamespace

import pytest

from megamed.train import telemetry
from megamed.train.telemetry import FIELDS, GpuTelemetry, as_row, format_short

LOGGER = "megamed.train.telemetry"


def _has_nvidia_driver() -> bool:
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def make_fake_pynvml() -> types.ModuleType:
    """A module with the slice of the pynvml API GpuTelemetry uses. gpu0: 80 GiB card, 40 GiB
    used, 97% busy, 350.5 W, 65 C. gpu1: MIG slice, power raises NotSupported."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    m.NVMLError, m.NVMLError_NotSupported = NVMLError, NVMLError_NotSupported
    m.NVML_TEMPERATURE_GPU = 0
    m.calls = {"power": 0, "init": 0, "shutdown": 0}
    gpus = [dict(used=40 * 2**30, total=80 * 2**30, util=97, power_mw=350_500, temp=65),
            dict(used=3 * 2**29, total=10 * 2**30, util=12, power_mw=None, temp=41)]

    def init():
        m.calls["init"] += 1

    def shutdown():
        m.calls["shutdown"] += 1

    def power(h):
        m.calls["power"] += 1
        if gpus[h]["power_mw"] is None:
            raise NVMLError_NotSupported("Not Supported")
        return gpus[h]["power_mw"]

    def temperature(h, sensor):
        assert sensor == m.NVML_TEMPERATURE_GPU
        return gpus[h]["temp"]

    m.nvmlInit, m.nvmlShutdown = init, shutdown
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # the handle is the index
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=gpus[h]["used"], total=gpus[h]["total"],
                                                          free=gpus[h]["total"] - gpus[h]["used"])
    m.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=gpus[h]["util"], memory=0)
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetTemperature = temperature
    return m


@pytest.mark.skipif(_has_nvidia_driver(), reason="this machine has an NVIDIA driver: the off path cannot be tested")
def test_off_without_driver_logs_one_line(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    tel = GpuTelemetry(every=5)
    assert not tel.enabled and tel.gpu_count == 0
    assert len([r for r in caplog.records if r.name == LOGGER and "telemetry off" in r.getMessage()]) == 1
    try:
        import pynvml  # noqa: F401  installed: the reason must be the missing driver/library
        assert "LibraryNotFound" in caplog.records[0].getMessage() or "NVML" in caplog.records[0].getMessage()
    except ImportError:
        assert "pip install nvidia-ml-py" in caplog.records[0].getMessage()
    caplog.clear()
    assert tel.sample() == [] and tel.sample() == []
    assert not tel.due(5) and not tel.due(10)
    assert format_short([]) == "" and as_row([]) == {}
    assert caplog.records == []  # silent after the one line
    tel.close()


def test_off_when_pynvml_missing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    tel = GpuTelemetry()
    assert not tel.enabled and tel.sample() == []
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(msgs) == 1 and "nvidia-ml-py" in msgs[0]


def test_enabled_with_fake_nvml(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    tel = GpuTelemetry(every=3)
    assert tel.enabled and tel.gpu_count == 2 and fake.calls["init"] == 1
    assert [tel.due(s) for s in (1, 2, 3, 6, 7)] == [False, False, True, True, False]

    s = tel.sample()
    assert len(s) == 2
    assert s[0] == {"index": 0, "mem_used_mib": 40 * 1024.0, "mem_total_mib": 80 * 1024.0, "util_pct": 97.0,
                    "power_w": 350.5, "temp_c": 65.0}
    assert s[1] == {"index": 1, "mem_used_mib": 1536.0, "mem_total_mib": 10240.0, "util_pct": 12.0,
                    "power_w": None, "temp_c": 41.0}
    off = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(off) == 1 and "gpu1" in off[0] and "power_w" in off[0] and "not supported" in off[0]

    # later samples: still no more log lines, and the unsupported query is not asked again
    powers = fake.calls["power"]
    caplog.clear()
    s2 = tel.sample()
    assert s2 == s and caplog.records == []
    assert fake.calls["power"] == powers + 1  # only gpu0's

    assert format_short(s) == "gpu0 40.0/80.0G 97% 350W 65C | gpu1 1.5/10.0G 12% 41C"
    row = tel.as_row(s)
    assert set(row) == {f"gpu{i}_{f}" for i in (0, 1) for f in FIELDS}
    assert row["gpu0_mem_used_mib"] == 40960.0 and row["gpu1_power_w"] is None and row["gpu1_temp_c"] == 41.0

    tel.close()
    tel.close()
    assert fake.calls["shutdown"] == 1 and not tel.enabled and tel.sample() == []


def test_other_nvml_error_at_init_switches_off(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = make_fake_pynvml()

    class NVMLError_DriverNotLoaded(fake.NVMLError):
        pass

    def init():
        raise NVMLError_DriverNotLoaded("Driver Not Loaded")

    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    tel = GpuTelemetry()
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert not tel.enabled and len(msgs) == 1 and "DriverNotLoaded" in msgs[0]


@pytest.mark.parametrize("every", [0, -1, 2.5, True, "5"])
def test_bad_every(every):
    with pytest.raises(ValueError, match="every"):
        GpuTelemetry(every=every)


def test_format_short_partial_fields():
    assert format_short([{"index": 3, "mem_used_mib": 2048.0, "mem_total_mib": None, "util_pct": None,
                          "power_w": 99.6, "temp_c": None}]) == "gpu3 2.0G 100W"
    assert telemetry.as_row([{"index": 1, "temp_c": 5.0}])["gpu1_temp_c"] == 5.0


def test_metrics_logger_writes_gpu_rows(tmp_path):
    """The trainer's sink for telemetry: logs/gpu.csv with the columns of the first row."""
    import csv

    from megamed.train.logging import MetricsLogger
    from megamed.train.telemetry import as_row

    samples = [{"index": 0, "mem_used_mib": 1024.0, "mem_total_mib": 81920.0, "util_pct": 97.0,
                "power_w": None, "temp_c": 61.0}]
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log_gpu(10, as_row(samples))
    logger.log_gpu(20, as_row(samples))
    logger.close()
    rows = list(csv.DictReader(open(tmp_path / "logs" / "gpu.csv")))
    assert [r["step"] for r in rows] == ["10", "20"]
    assert rows[0]["gpu0_mem_used_mib"] == "1024.0" and rows[0]["gpu0_power_w"] == ""
