"""Jetson telemetry: samples from jetson-stats (`jtop`) or `tegrastats`, a background sampler, and
the clock-lock check.

Where jetson-stats is installed and its service answers, the sampler reads `jtop`'s documented
attributes (the numbers `jtop` shows); otherwise it runs `tegrastats`, which every JetPack ships.
tegrastats prints one dense line per interval; its fields vary by module and JetPack (Nano's
`POM_5V_IN 2532/2532`, Xavier's and Orin Nano's `VDD_IN 5251mW/8535mW`, AGX Orin's
`VIN_SYS_5V0 …`; `GR3D_FREQ 0%@921` or `0%@[305,305]`). The parser takes what a line has and
ignores the rest. Unconnected sensors report -256 °C and are dropped.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CORE = re.compile(r"(\d+)%@(\d+)")
_ENGINE = re.compile(r"\b(EMC_FREQ|GR3D_FREQ) (\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMPERATURE = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?\b")
# The board's total input, by generation; "TOT" is jtop's estimate where it lists no input rail.
_POWER_INPUT_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN", "TOT")


@dataclass(frozen=True)
class TegraSample:
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    cpu_load_pct: list[int | None] = field(default_factory=list)  # None: core off
    cpu_freq_mhz: list[int | None] = field(default_factory=list)
    gpu_load_pct: int | None = None
    gpu_freq_mhz: int | None = None
    emc_load_pct: int | None = None
    emc_freq_mhz: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, int] = field(default_factory=dict)  # rail → instantaneous milliwatts

    @property
    def input_power_mw(self) -> int | None:
        return next((self.power_mw[r] for r in _POWER_INPUT_RAILS if r in self.power_mw), None)


def parse_tegrastats(line: str) -> TegraSample:
    values: dict = {}
    if ram := _RAM.search(line):
        values["ram_used_mb"], values["ram_total_mb"] = int(ram.group(1)), int(ram.group(2))
    if cpu := _CPU.search(line):
        cores = [_CORE.fullmatch(c.strip()) for c in cpu.group(1).split(",")]
        values["cpu_load_pct"] = [int(c.group(1)) if c else None for c in cores]
        values["cpu_freq_mhz"] = [int(c.group(2)) if c else None for c in cores]
    for name, load, freqs in _ENGINE.findall(line):
        freq = max(int(f) for f in freqs.split(",")) if freqs else None
        prefix = "gpu" if name == "GR3D_FREQ" else "emc"
        values[f"{prefix}_load_pct"], values[f"{prefix}_freq_mhz"] = int(load), freq
    temperatures = {name: float(t) for name, t in _TEMPERATURE.findall(line) if float(t) > -200}
    power = {rail: int(now) for rail, now, _ in _POWER.findall(line) if rail not in ("RAM", "SWAP")}
    return TegraSample(**values, temperatures_c=temperatures, power_mw=power)


def jtop_sample(jetson) -> TegraSample:
    """A reading of jetson-stats' `jtop` client as a sample, from the attributes its API documents
    (`memory` in kB, `cpu`/`gpu`/EMC clocks in kHz, `power` rails and total in mW, `temperature`
    in °C with -256 for a sensor that is not there)."""
    memory, cores = jetson.memory, jetson.cpu["cpu"]
    gpu = next(iter(jetson.gpu.values()), None)
    emc = memory["EMC"] if "EMC" in memory else None
    power = jetson.power or {}
    rails = {name: int(rail["power"]) for name, rail in power.get("rail", {}).items()}
    if "tot" in power:
        rails["TOT"] = int(power["tot"]["power"])
    return TegraSample(
        ram_used_mb=memory["RAM"]["used"] // 1024, ram_total_mb=memory["RAM"]["tot"] // 1024,
        cpu_load_pct=[round(100 - core["idle"]) if core["online"] else None for core in cores],
        cpu_freq_mhz=[core["freq"]["cur"] // 1000 if core["online"] else None for core in cores],
        gpu_load_pct=round(gpu["status"]["load"]) if gpu else None,
        gpu_freq_mhz=gpu["freq"]["cur"] // 1000 if gpu else None,
        emc_load_pct=round(emc["val"]) if emc else None, emc_freq_mhz=emc["cur"] // 1000 if emc else None,
        temperatures_c={name: float(t["temp"]) for name, t in jetson.temperature.items()
                        if t.get("online", True) and t["temp"] > -200},
        power_mw=rails)


def tegrastats_available() -> bool:
    return shutil.which("tegrastats") is not None


class TelemetrySampler:
    """Keeps samples every `interval_ms` while in the `with` block: from jetson-stats' jtop where it
    is installed and its service answers, else from a `tegrastats --interval` process."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.samples: list[TegraSample] = []
        self.source: str | None = None  # "jtop" | "tegrastats"
        self._stop: Callable[[], None] | None = None

    def __enter__(self) -> TelemetrySampler:
        self._stop = self._start_jtop() or self._start_tegrastats()
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _start_jtop(self) -> Callable[[], None] | None:
        try:
            from jtop import JtopException, jtop
        except ImportError:
            return None
        client = jtop(interval=self.interval_ms / 1000)
        client.attach(lambda jetson: self.samples.append(jtop_sample(jetson)))
        try:
            client.start()
        except (JtopException, OSError):  # jtop.service not installed, not running, or another version
            return None
        self.source = "jtop"
        return client.close

    def _start_tegrastats(self) -> Callable[[], None]:
        process = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

        def read() -> None:
            for line in process.stdout:
                self.samples.append(parse_tegrastats(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.source = "tegrastats"

        def stop() -> None:
            process.terminate()
            process.wait(timeout=5)
            reader.join(timeout=5)
        return stop

    def summary(self) -> dict:
        return {"source": self.source, **summarise(self.samples)}


def summarise(samples: list[TegraSample]) -> dict:
    """Mean and peak of what matters for a latency report: input power, GPU load and clock, heat."""
    def stats(values):
        values = [v for v in values if v is not None]
        return {"mean": statistics.fmean(values), "max": max(values)} if values else None

    return {
        "samples": len(samples),
        "input_power_mw": stats([s.input_power_mw for s in samples]),
        "gpu_load_pct": stats([s.gpu_load_pct for s in samples]),
        "gpu_freq_mhz": stats([s.gpu_freq_mhz for s in samples]),
        "emc_freq_mhz": stats([s.emc_freq_mhz for s in samples]),
        "max_temperature_c": max((max(s.temperatures_c.values()) for s in samples if s.temperatures_c), default=None),
        "ram_used_mb": stats([s.ram_used_mb for s in samples]),
    }


def clocks_locked(sysfs: Path = Path("/sys")) -> bool | None:
    """True when CPU and GPU clocks are pinned (min == max, as `jetson_clocks` leaves them), False
    when they float, None when this is not a Jetson. Floating clocks make latency numbers noisy."""
    gpus = [d for d in (sysfs / "class" / "devfreq").glob("*") if re.search(r"gpu|gv11b|ga10b|gp10b|gm20b", d.name)]
    if not gpus:
        return None
    pinned = []
    for cpu in sorted((sysfs / "devices" / "system" / "cpu").glob("cpu[0-9]*/cpufreq")):
        pinned.append(_read(cpu / "scaling_min_freq") == _read(cpu / "scaling_max_freq"))
    for gpu in gpus:
        pinned.append(_read(gpu / "min_freq") == _read(gpu / "max_freq"))
    return all(pinned)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
