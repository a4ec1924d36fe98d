"""CPU package and DRAM energy from RAPL counters in the Linux powercap sysfs tree.

Layout read (``root`` defaults to ``/sys/class/powercap`` and is injectable, so tests
read a fake tree and a container can read a bind-mounted one)::

    <root>/intel-rapl:0/name                  "package-0"  (or "package-0-die-1")
    <root>/intel-rapl:0/energy_uj             cumulative energy, microjoules
    <root>/intel-rapl:0/max_energy_range_uj   the value at which energy_uj wraps to 0
    <root>/intel-rapl:0/intel-rapl:0:M/name   "core", "uncore" or "dram"

* **Every package**: the ``cpu`` domain is the sum over all top-level zones whose name
  starts with ``package`` (one per socket, or per die on multi-die parts). ``psys``
  (the whole platform, which contains the packages) is left out, and so is the
  ``intel-rapl-mmio`` control type (a second interface to the same package counter):
  either would count the same joules twice.
* **DRAM**: the ``dram`` domain is the sum of the ``dram`` subzones, measured only when
  every package has one; a partial sum would pass for the whole.
* **AMD**: since Linux 5.8 the ``intel_rapl_msr`` driver exposes AMD (and Hygon) Zen
  packages in this same tree -- ``intel-rapl:N`` named ``package-N`` with a ``core``
  subzone and no DRAM zone -- so they are read like Intel packages. Zones under an
  ``amd-rapl`` control type, which some kernels and out-of-tree drivers use, are read
  the same way.
* **Wraparound**: a counter wraps to 0 after ``max_energy_range_uj`` (every few minutes
  to hours, depending on the part and its load). A reading lower than the previous one
  is a wrap and adds ``max_energy_range_uj - previous + current``. To catch more than
  one wrap in a long window, a watcher thread folds the counters in at least twice per
  shortest wrap period (assuming at most 1 kW per zone).
* **Permissions**: since the fix for CVE-2020-8694 (PLATYPUS, November 2020),
  ``energy_uj`` is readable by root only on most distributions. That is reported as a
  ``no-permission`` skip whose message gives the command that grants read access.

pyRAPL is not used: it reads a fixed ``/sys/class/powercap`` path (no fake tree, no
bind mount), ignores wraparound (a window spanning one comes out negative), requires a
DRAM zone on every socket or loses DRAM entirely, and lets a root-only ``energy_uj``
surface as a bare ``PermissionError``. Reading the files directly costs less code than
working around it.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from workers.meters.base import Domain, MeterError, Sensor, SensorUnavailable

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
CONTROL_TYPES: tuple[str, ...] = ("intel-rapl", "amd-rapl")

# The watcher must read each counter before it can wrap twice; this bounds a zone's power.
_MAX_ZONE_POWER_W = 1000.0
_MAX_POLL_INTERVAL_S = 10.0
_MIN_POLL_INTERVAL_S = 0.05


def _read_text(path: Path) -> str:
    """The one place a sysfs file is read (tests patch it to simulate a root-only file)."""
    with open(path, encoding="ascii") as f:
        return f.read().strip()


@dataclass(frozen=True)
class RaplZone:
    """One powercap zone: a package, or a subzone such as ``dram``."""

    path: Path
    name: str
    max_energy_range_uj: int

    def read_energy_uj(self) -> int:
        """The cumulative counter; raises :class:`MeterError` when it cannot be read."""
        energy_path = self.path / "energy_uj"
        try:
            return int(_read_text(energy_path))
        except PermissionError as e:
            raise SensorUnavailable("no-permission", _permission_message(energy_path)) from e
        except (OSError, ValueError) as e:
            raise MeterError(f"cannot read RAPL counter {energy_path}: {e}") from e


class RaplSensor(Sensor):
    """Wrap-aware sum of RAPL counters over a window (the ``rapl`` source).

    ``poll_interval_s`` is how often the watcher thread folds the counters in; by
    default half the shortest wrap period at :data:`_MAX_ZONE_POWER_W`, clamped to
    [0.05 s, 10 s].
    """

    source = "rapl"

    def __init__(self, domain: Domain, zones: Sequence[RaplZone], poll_interval_s: float | None = None) -> None:
        if not zones:
            raise ValueError("a RaplSensor needs at least one zone")
        self.domain = domain
        self.zones = tuple(zones)
        if poll_interval_s is None:
            shortest_wrap_s = min(z.max_energy_range_uj for z in self.zones) / 1e6 / _MAX_ZONE_POWER_W
            poll_interval_s = min(max(shortest_wrap_s / 2, _MIN_POLL_INTERVAL_S), _MAX_POLL_INTERVAL_S)
        self.poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._last_uj: list[int] = []
        self._total_uj = 0
        self._stop_event = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watch_error: BaseException | None = None

    def start(self) -> None:
        self.close()
        with self._lock:
            self._last_uj = [z.read_energy_uj() for z in self.zones]
            self._total_uj = 0
        self._stop_event = threading.Event()
        self._watch_error = None
        self._watcher = threading.Thread(target=self._watch, name=f"rapl-{self.domain}-watcher", daemon=True)
        self._watcher.start()

    def poll(self) -> None:
        """Fold each counter's progress since the last read into the window, counting a
        reading below the previous one as one wrap. Called by the watcher thread; safe
        to call from any thread while a window is open."""
        with self._lock:
            for i, zone in enumerate(self.zones):
                now_uj = zone.read_energy_uj()
                last_uj = self._last_uj[i]
                if now_uj >= last_uj:
                    self._total_uj += now_uj - last_uj
                else:
                    self._total_uj += zone.max_energy_range_uj - last_uj + now_uj
                self._last_uj[i] = now_uj

    def stop(self) -> float:
        if self._watcher is None:
            raise RuntimeError("RaplSensor.stop() called without start()")
        self.close()
        self._watcher = None
        if self._watch_error is not None:
            raise MeterError(f"RAPL watcher failed during the window: {self._watch_error}") from self._watch_error
        self.poll()
        return self._total_uj / 1e6

    def close(self) -> None:
        self._stop_event.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()

    def describe(self) -> dict[str, Any]:
        return {
            "zones": [{"path": str(z.path), "name": z.name, "max_energy_range_uj": z.max_energy_range_uj} for z in self.zones],
            "poll_interval_s": self.poll_interval_s,
        }

    def _watch(self) -> None:
        while not self._stop_event.wait(self.poll_interval_s):
            try:
                self.poll()
            except BaseException as e:  # noqa: BLE001 - surfaced by stop(), not lost in a thread
                self._watch_error = e
                return


def probe_rapl(domain: Domain, root: str | Path = DEFAULT_POWERCAP_ROOT) -> RaplSensor:
    """A :class:`RaplSensor` for ``domain`` (``cpu``: every package; ``dram``: every
    package's DRAM subzone), or :class:`SensorUnavailable` saying why not."""
    if domain not in ("cpu", "dram"):
        raise SensorUnavailable("not-applicable", f"RAPL measures CPU packages and DRAM, not {domain}")
    root = Path(root)
    if not root.is_dir():
        raise SensorUnavailable(
            "absent",
            f"{root} does not exist: no powercap interface on this node (a VM or container without "
            "RAPL, a non-x86 CPU, or the intel_rapl_msr module not loaded)",
        )
    try:
        control_type, packages = _package_dirs(root)
    except OSError as e:
        raise SensorUnavailable("error", f"cannot list the powercap tree {root}: {e}") from e
    if not packages:
        raise SensorUnavailable(
            "absent", f"no RAPL package zone under {root} (looked for {', '.join(c + ':N' for c in CONTROL_TYPES)})"
        )
    if domain == "cpu":
        zone_dirs = packages
    else:
        zone_dirs = []
        for package in packages:
            dram = _dram_subzone(package, control_type)
            if dram is None:
                raise SensorUnavailable(
                    "unsupported",
                    f"{package.name} ({_read_name(package)}) has no 'dram' subzone; DRAM energy is not "
                    "reported by this CPU (AMD packages and most client CPUs expose none)",
                )
            zone_dirs.append(dram)
    zones = [_zone(d) for d in zone_dirs]
    for zone in zones:
        try:
            zone.read_energy_uj()  # the counter itself may be root-only while its name is not
        except SensorUnavailable:
            raise
        except MeterError as e:
            raise SensorUnavailable("error", str(e)) from e
    return RaplSensor(domain, zones)


def _package_dirs(root: Path) -> tuple[str, list[Path]]:
    """The first control type with package zones, and those zones' directories in order."""
    for control_type in CONTROL_TYPES:
        pattern = re.compile(rf"{re.escape(control_type)}:(\d+)")
        found = []
        for entry in root.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and _read_name(entry).startswith("package"):
                found.append((int(match.group(1)), entry))
        if found:
            return control_type, [path for _, path in sorted(found)]
    return CONTROL_TYPES[0], []


def _dram_subzone(package: Path, control_type: str) -> Path | None:
    pattern = re.compile(rf"{re.escape(control_type)}:\d+:\d+")
    for entry in sorted(package.iterdir()):
        if pattern.fullmatch(entry.name) and entry.is_dir() and _read_name(entry) == "dram":
            return entry
    return None


def _read_name(zone_dir: Path) -> str:
    try:
        return _read_text(zone_dir / "name")
    except OSError:
        return ""


def _zone(zone_dir: Path) -> RaplZone:
    range_path = zone_dir / "max_energy_range_uj"
    try:
        max_energy_range_uj = int(_read_text(range_path))
    except PermissionError as e:
        raise SensorUnavailable("no-permission", _permission_message(range_path)) from e
    except (OSError, ValueError) as e:
        raise SensorUnavailable("error", f"cannot read {range_path}: {e}") from e
    return RaplZone(path=zone_dir, name=_read_name(zone_dir), max_energy_range_uj=max_energy_range_uj)


def _permission_message(path: Path) -> str:
    # The fix is made on the host's sysfs, where every zone (subzones too) has a flat entry.
    zones = f"{DEFAULT_POWERCAP_ROOT}/{path.parent.name.split(':')[0]}:*/{path.name}"
    return (
        f"cannot read {path}: RAPL counters are root-only since the fix for CVE-2020-8694 "
        f"(PLATYPUS). Grant read access until reboot with 'sudo chmod o+r {zones}', or for good "
        "with a udev rule such as 'ACTION==\"add\", SUBSYSTEM==\"powercap\", "
        "RUN+=\"/bin/chmod o+r /sys%p/energy_uj\"' in /etc/udev/rules.d/99-rapl.rules "
        "(this lets local users read the counters the fix protected; a group is narrower than o+r)"
    )
