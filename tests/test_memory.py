"""core.memory: the file pages under a memory-mapped tensor leave the process's resident memory, the data
stays readable, and nothing else is touched."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hubtool.core.memory import release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page tables")
MB = 2**20


def mapped_rss(name: str) -> int:
    """Resident bytes of this process's mappings of files called ``name`` (from the page tables)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = line.rstrip().endswith(name)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_released_pages_leave_the_resident_memory_and_the_data_stays(tmp_path):
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.randn(4096, 2048), "b": torch.randn(4096, 2048)}, str(path))  # 32 MiB each
    with safe_open(str(path), "pt") as f:
        a, b = f.get_tensor("a"), f.get_tensor("b")
    sums = float(a.double().sum()), float(b.double().sum())  # every page read
    before = mapped_rss(path.name)
    assert before >= 60 * MB
    released = release_file_pages(a)
    assert 31 * MB <= released <= 32 * MB
    after = mapped_rss(path.name)
    assert before - after >= 31 * MB
    assert after >= 31 * MB  # b's pages stay
    assert (float(a.double().sum()), float(b.double().sum())) == sums


def test_anonymous_memory_and_written_file_pages_are_left_alone(tmp_path):
    t = torch.randn(4096, 2048)
    want = t.clone()
    assert release_file_pages(t) == 0
    assert torch.equal(t, want)
    path = tmp_path / "one.safetensors"
    save_file({"a": torch.randn(4096, 2048)}, str(path))
    with safe_open(str(path), "pt") as f:
        a = f.get_tensor("a")
    a[2048:] = 7.0  # copy-on-write: these pages are the process's own now
    want = a.clone()
    assert release_file_pages(a) == 0
    assert torch.equal(a, want)
