"""Every reference figure of the official code, in one place, with the machine and date it was measured on.

A timing ratio means something only when both figures come from one machine. :func:`official` returns the
reference measured on a machine of the same kind as this one (matched on the CPU model string), and when there
is none, the closest one with a label that says so (``"... measured on another machine (...): not comparable"``),
which the report shows beside the ratio. Machine-independent references (parameter counts, FLOPs) have no machine.

The timings were measured by running the official repositories' own code, one after the other with ours, on the
machines named (issue 9 on the AMD EPYC reference machine, issue 17 on an Intel Xeon with AMX), 2 cores each.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OFFICIAL", "Reference", "cpu_model", "official"]


@dataclass(frozen=True)
class Reference:
    """One official figure.

    Args:
        value: the figure.
        unit: its unit.
        what: what was measured (settings).
        machine: where (``None`` for machine-independent figures such as parameter counts).
        cpu_match: substring of ``/proc/cpuinfo``'s model name that identifies a machine of that kind.
        date: when it was measured.
        source: where the figure is written down.
    """

    value: float
    unit: str
    what: str
    machine: str | None = None
    cpu_match: str | None = None
    date: str | None = None
    source: str = ""

    def label(self, same_machine: bool = True) -> str:
        """Text for the report's "reference is" column."""
        where = f", {self.machine}, {self.date}" if self.machine else ""
        text = f"official: {self.what}{where} ({self.source})" if self.source else f"official: {self.what}{where}"
        return text if same_machine else f"{text}; measured on another machine: ratio not comparable"


_EPYC = {"machine": "AMD EPYC (no AMX), 2 cores", "cpu_match": "AMD EPYC", "date": "2026-11", "source": "issue 9"}
_XEON = {"machine": "Intel Xeon with AMX, 2 cores", "cpu_match": "Intel", "date": "2026-11-30", "source": "issue 17"}

#: key -> the official figures (one per machine kind it was measured on).
OFFICIAL: dict[str, tuple[Reference, ...]] = {
    "damm_params_used": (Reference(111_457_617, "parameters", "UNet_DAMM parameters in use", source="damm.md §2.9"),),
    "damm_forward_gflop": (Reference(6.67, "GFLOP", "UNet_DAMM forward per sample", source="damm.md §2.9"),),
    "damm_train_step_s_b16": (
        Reference(5.67, "s", "divergence-aware training step, paper config, batch 16, fp32", **_EPYC),
        Reference(5.20, "s", "divergence-aware training step, paper config, batch 16, fp32", **_XEON),
    ),
    "damm_sample_s_per_image": (
        Reference(83.6, "s", "DDPM-1000 sampling of one image, paper config, fp32", **_EPYC),
        Reference(78.4, "s", "DDPM-1000 sampling of one image, paper config, fp32", **_XEON),
    ),
    "drdm_forward_3d_128_t79_s": (
        Reference(5.52, "s", "DeformDDPM forward, 3D 128^3, t=79, fp32", **_EPYC),
        Reference(4.94, "s", "DeformDDPM forward, 3D 128^3, t=79, fp32", **_XEON),
    ),
    "drdm_forward_2d_256_b8_t79_s": (
        Reference(0.070, "s", "DeformDDPM forward, 2D 256^2, batch 8, t=79, fp32", **_XEON),
    ),
    "drdm_augment_2d_256_s_per_output": (
        Reference(15.4, "s", "DRDM_augment.py, one 2D 256^2 output (80 recovery steps x 2 passes), fp32", **_EPYC),
        Reference(13.9, "s", "DRDM_augment.py, one 2D 256^2 output (80 recovery steps x 2 passes), fp32", **_XEON),
    ),
}


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def official(key: str, cpu: str | None = None) -> tuple[float, str]:
    """The official figure for ``key`` and its report label, preferring one measured on this kind of machine.

    Args:
        key: an entry of :data:`OFFICIAL`.
        cpu: the CPU model to match (default: this machine's).

    Returns:
        ``(value, label)``; the label says when the figure comes from another machine.

    Raises:
        KeyError: an unknown key.
    """
    if key not in OFFICIAL:
        raise KeyError(f"no official reference {key!r}; known: {sorted(OFFICIAL)}")
    refs = OFFICIAL[key]
    cpu = cpu_model() if cpu is None else cpu
    for ref in refs:
        if ref.machine is None or (ref.cpu_match and ref.cpu_match in cpu):
            return ref.value, ref.label()
    return refs[0].value, refs[0].label(same_machine=False)
