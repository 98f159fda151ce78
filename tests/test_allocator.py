"""glibc's allocator keeps freed tensor memory (ddcore.allocator.keep_freed_memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddcore import allocator

REPO = Path(__file__).resolve().parents[1]

#: A bf16-autocast training step of two 8 MiB linear layers (weight copies, gradients, activations of 2-8 MiB are
#: allocated and freed every step); the minor page faults of three steps after two warm-up steps. Without the
#: setting, glibc's mmap threshold is held at its start value (128 KiB) so that the comparison is deterministic.
_CHURN = """
import ctypes, resource, sys, torch
from ddcore.allocator import keep_freed_memory
torch.set_num_threads(1)
applied = keep_freed_memory(sys.argv[1] == "1")
if not applied:  # glibc's start value, fixed (its dynamic raise depends on the order of frees)
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
opt = torch.optim.SGD(net.parameters(), lr=1e-3)
x = torch.randn(512, 1024)
def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    y.float().square().mean().backward()
    opt.step()
step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults(enabled: bool) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, "1" if enabled else "0"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    return out[0] == "True", float(out[1])


def test_disabled_does_nothing():
    assert allocator.keep_freed_memory(False) is False


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.keep_freed_memory(True) is False


@pytest.mark.skipif(allocator._libc() is None, reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    """A training step reuses the memory the last one freed: far fewer page faults than with glibc's defaults."""
    applied_off, off = _faults(False)
    applied_on, on = _faults(True)
    assert (applied_off, applied_on) == (False, True)
    assert off > 5000  # every block above 128 KiB is mapped and zero-filled again each step
    assert on < 0.2 * off
