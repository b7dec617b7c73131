"""`zspa-profile` end to end, its JSON schema, and the Jetson telemetry parser."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from zspa.runtime.jetson import clocks_locked, parse_tegrastats, summarise
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
