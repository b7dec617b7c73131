"""`zspa-profile` end to end, its JSON schema, and the Jetson telemetry parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import jsonschema
import pytest

from zspa.runtime.jetson import TelemetrySampler, clocks_locked, jtop_sample, parse_tegrastats, summarise
from zspa.runtime.profiling import SCHEMA_PATH

# tegrastats lines in the formats of four Jetson generations (JetPack 4.6 to 6.x).
NANO = ("RAM 1714/3964MB (lfb 1x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [12%@1479,7%@1479,9%@1479,8%@1479] EMC_FREQ 3%@1600 GR3D_FREQ 76%@921 APE 25 PLL@32C CPU@34.5C "
        "PMIC@100C GPU@34C AO@40.5C thermal@34C POM_5V_IN 4532/4100 POM_5V_GPU 1210/900 POM_5V_CPU 805/705")
XAVIER_NX = ("07-09-2024 13:31:31 RAM 3168/6851MB (lfb 2x4MB) SWAP 161/3426MB (cached 0MB) "
             "CPU [23%@1397,17%@1192,16%@1190,13%@1190,off,off] EMC_FREQ 2%@204 GR3D_FREQ 0%@[114] VIC_FREQ 115 "
             "APE 150 AUX@45C CPU@46.5C thermal@45.6C AO@45C GPU@45.5C PMIC@50C VDD_IN 2763mW/2846mW "
             "VDD_CPU_GPU_CV 650mW/670mW VDD_SOC 650mW/711mW")
ORIN_NANO = ("10-08-2026 04:35:02 RAM 6712/7620MB (lfb 12x4MB) SWAP 369/3810MB (cached 8MB) "
             "CPU [38%@1497,2%@729,1%@729,0%@729,1%@729,0%@729] EMC_FREQ 61%@2133 GR3D_FREQ 99%@[624] "
             "NVDEC off VIC off APE 200 cpu@55.5C soc2@52.1C soc0@53.0C gpu@57.25C tj@57.25C soc1@52.9C "
             "VDD_IN 11820mW/9035mW VDD_CPU_GPU_CV 5120mW/3410mW VDD_SOC 3011mW/2844mW")
AGX_ORIN = ("RAM 2448/30536MB (lfb 6612x4MB) SWAP 0/15268MB (cached 0MB) CPU [1%@729,0%@729,0%@729,0%@729,"
            "0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 12%@[305,305] "
            "VIC_FREQ 729 APE 174 CV0@-256C CPU@45.5C Tboard@32C SOC2@42.281C Tdiode@33.75C SOC0@42.593C "
            "GPU@-256C tj@45.5C VDD_GPU_SOC 3065mW/3065mW VDD_CPU_CV 766mW/766mW VIN_SYS_5V0 3623mW/3623mW")


def test_tegrastats_lines_of_every_generation():
    nano, xavier, orin_nano, agx = map(parse_tegrastats, (NANO, XAVIER_NX, ORIN_NANO, AGX_ORIN))
    assert (nano.ram_used_mb, nano.ram_total_mb, nano.gpu_load_pct, nano.gpu_freq_mhz) == (1714, 3964, 76, 921)
    assert nano.input_power_mw == 4532 and nano.power_mw["POM_5V_GPU"] == 1210
    assert xavier.cpu_load_pct == [23, 17, 16, 13, None, None] and xavier.cpu_freq_mhz[0] == 1397
    assert (xavier.gpu_freq_mhz, xavier.emc_freq_mhz, xavier.input_power_mw) == (114, 204, 2763)
    assert orin_nano.gpu_load_pct == 99 and orin_nano.temperatures_c["tj"] == 57.25
    assert orin_nano.input_power_mw == 11820 and "RAM" not in orin_nano.power_mw
    assert agx.gpu_freq_mhz == 305 and agx.input_power_mw == 3623
    assert "CV0" not in agx.temperatures_c and "GPU" not in agx.temperatures_c  # -256 °C: no sensor
    summary = summarise([orin_nano, parse_tegrastats(ORIN_NANO.replace("VDD_IN 11820mW", "VDD_IN 8180mW"))])
    assert summary["input_power_mw"] == {"mean": 10000.0, "max": 11820}
    assert summary["max_temperature_c"] == 57.25 and summary["samples"] == 2


def _jtop_reading(gpu_load: float = 99.0) -> types.SimpleNamespace:
    """What a jetson-stats client holds on an Orin Nano, in the shapes and units its API documents."""
    core = {"online": True, "idle": 62.0, "freq": {"cur": 1497600, "min": 115200, "max": 1497600}}
    return types.SimpleNamespace(
        memory={"RAM": {"tot": 7802880, "used": 6873088}, "SWAP": {"tot": 3901440, "used": 377856},
                "EMC": {"online": True, "val": 61, "cur": 2133000}},
        cpu={"total": {}, "cpu": [core, {"online": False}]},
        gpu={"gpu": {"type": "integrated", "status": {"load": gpu_load}, "freq": {"cur": 624750}}},
        power={"rail": {"VDD_IN": {"power": 11820}, "VDD_SOC": {"power": 3011}}, "tot": {"power": 11820}},
        temperature={"tj": {"online": True, "temp": 57.25}, "cv0": {"online": False, "temp": -256}})


def test_a_jtop_reading_becomes_the_same_sample_as_tegrastats_line():
    sample = jtop_sample(_jtop_reading())
    line = parse_tegrastats(ORIN_NANO)
    assert (sample.ram_used_mb, sample.ram_total_mb) == (6712, 7620) == (line.ram_used_mb, line.ram_total_mb)
    assert sample.cpu_load_pct == [38, None] and sample.cpu_freq_mhz == [1497, None]
    assert (sample.gpu_load_pct, sample.gpu_freq_mhz) == (99, 624) == (line.gpu_load_pct, line.gpu_freq_mhz)
    assert (sample.emc_load_pct, sample.emc_freq_mhz) == (61, 2133) == (line.emc_load_pct, line.emc_freq_mhz)
    assert sample.input_power_mw == 11820 == line.input_power_mw
    assert sample.temperatures_c == {"tj": 57.25}  # the absent sensor (-256 °C) dropped
    without_rails = jtop_sample(types.SimpleNamespace(**{**vars(_jtop_reading()), "power": {
        "rail": {"VDD_GPU_SOC": {"power": 3065}}, "tot": {"power": 7454}}}))
    assert without_rails.input_power_mw == 7454  # jtop's total where no input rail is listed


@pytest.fixture
def fake_tegrastats(tmp_path, monkeypatch):
    """A `tegrastats` on PATH that prints the Orin Nano line at its --interval, as the real one does."""
    script = tmp_path / "bin" / "tegrastats"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nwhile true; do echo '{ORIN_NANO}'; sleep 0.02; done\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")


def _jtop_module(start) -> types.ModuleType:
    """A stand-in for the `jtop` package: its client class calls `start(client)` when started."""
    module = types.ModuleType("jtop")
    module.JtopException = type("JtopException", (Exception,), {})

    class Client:
        def __init__(self, interval):
            self.observers, self.closed = [], False

        def attach(self, observer):
            self.observers.append(observer)

        def start(self):
            start(self, module)

        def close(self):
            self.closed = True
    module.jtop = Client
    return module


def _sample_briefly(sampler: TelemetrySampler) -> TelemetrySampler:
    with sampler:
        deadline = time.monotonic() + 10
        while not sampler.samples and time.monotonic() < deadline:
            time.sleep(0.02)
    return sampler


def test_the_sampler_runs_tegrastats_without_jetson_stats(fake_tegrastats, monkeypatch):
    monkeypatch.setitem(sys.modules, "jtop", None)  # not installed
    sampler = _sample_briefly(TelemetrySampler(interval_ms=20))
    assert sampler.source == "tegrastats" and sampler.samples[0] == parse_tegrastats(ORIN_NANO)
    assert sampler.summary()["source"] == "tegrastats"


def test_the_sampler_falls_back_to_tegrastats_when_the_jtop_service_is_down(fake_tegrastats, monkeypatch):
    def refuse(client, module):
        raise module.JtopException("The jtop.service is not active. Please run:\nsudo jtop --install-service")

    monkeypatch.setitem(sys.modules, "jtop", _jtop_module(refuse))
    sampler = _sample_briefly(TelemetrySampler(interval_ms=20))
    assert sampler.source == "tegrastats" and sampler.samples


def test_the_sampler_reads_jtop_where_its_service_answers(monkeypatch):
    clients = []

    def answer(client, module):
        clients.append(client)
        for load in (40.0, 80.0):
            for observer in client.observers:
                observer(_jtop_reading(gpu_load=load))

    monkeypatch.setitem(sys.modules, "jtop", _jtop_module(answer))
    monkeypatch.setenv("PATH", "")  # no tegrastats either: jtop must be what answered
    sampler = _sample_briefly(TelemetrySampler())
    summary = sampler.summary()
    assert summary["source"] == "jtop" and summary["samples"] == 2 and clients[0].closed
    assert summary["gpu_load_pct"] == {"mean": 60.0, "max": 80}


def _sysfs(root, cpu_range, gpu_range):
    for i in range(2):
        cpu = root / "devices" / "system" / "cpu" / f"cpu{i}" / "cpufreq"
        cpu.mkdir(parents=True)
        (cpu / "scaling_min_freq").write_text(f"{cpu_range[0]}\n")
        (cpu / "scaling_max_freq").write_text(f"{cpu_range[1]}\n")
    if gpu_range:
        gpu = root / "class" / "devfreq" / "17000000.ga10b"
        gpu.mkdir(parents=True)
        (gpu / "min_freq").write_text(str(gpu_range[0]))
        (gpu / "max_freq").write_text(str(gpu_range[1]))
    return root


def test_clock_lock_detection(tmp_path):
    assert clocks_locked(_sysfs(tmp_path / "a", (1497600, 1497600), (624750000, 624750000))) is True
    assert clocks_locked(_sysfs(tmp_path / "b", (729600, 1497600), (624750000, 624750000))) is False
    assert clocks_locked(_sysfs(tmp_path / "c", (1497600, 1497600), (306000000, 624750000))) is False
    assert clocks_locked(_sysfs(tmp_path / "d", (1, 2), None)) is None  # not a Jetson


def profile_cli(*args):
    return subprocess.run([sys.executable, "-m", "zspa.cli.profile", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=600)


def test_profile_end_to_end(tiny_bundle, photo_path, tmp_path):
    out = tmp_path / "prof"
    run = profile_cli(tiny_bundle, "--image", photo_path, "--runs", "3", "--warmup", "1", "--max-new-tokens", "5",
                      "--out", out)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "profile.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    rows = {(r["method"], r["keep"]): r for r in report["settings"]}
    assert set(rows) == {("none", 1.0), ("zspa", 0.1), ("zspa", 0.25)}
    assert rows[("zspa", 0.1)]["visual_tokens"] == {"total": 576, "kept": 58}
    assert all(r["tokens_generated"] == 5 for r in rows.values())  # EOS ignored: equal decode work
    # KV cache: 2 (K, V) × 2 layers × 2 KV heads × 16 dims × 4 bytes per position
    assert rows[("zspa", 0.1)]["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * (rows[("zspa", 0.1)]["prompt_tokens"] + 5)
    full, pruned = rows[("none", 1.0)]["latency_ms"], rows[("zspa", 0.1)]["latency_ms"]
    assert pruned["prune"]["p50"] > 10 * full["prune"]["p50"]  # a pruner ran only where keep < 1
    for stage in full:
        assert full[stage]["p50"] <= full[stage]["p90"] <= full[stage]["p99"]
    for name in ("stages.png", "ttft_vs_keep.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000
    assert "| zspa | 0.1 | 576→58 |" in (out / "profile.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--keeps", "1.3"], "keep must be in (0, 1]"),
    (["--runs", "0"], "--runs"),
    (["--methods", "dart"], "'dart' is not in this bundle"),
    (["--image", "/nonexistent.jpg"], "no such file"),
])
def test_profile_refuses_bad_arguments(tiny_bundle, tmp_path, args, message):
    run = profile_cli(tiny_bundle, "--out", tmp_path / "p", *args)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "p").exists()


def test_a_device_without_matplotlib_gets_the_numbers_and_no_charts(tiny_bundle, photo_path, tmp_path, monkeypatch,
                                                                     capsys):
    """The runtime install has no matplotlib: the report is written, the charts are skipped with a
    line saying how to get them (they used to fail the run after all its measurements)."""
    import importlib.util

    from zspa.cli.profile import main

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else found(name, *a))
    out = tmp_path / "prof"
    assert main([str(tiny_bundle), "--image", str(photo_path), "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
                 "--keeps", "0.1", "--out", str(out), "--quiet"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["profile.json", "profile.md"]
    assert "matplotlib is not installed, so no charts (pip install 'zspa[plots]')" in capsys.readouterr().err
