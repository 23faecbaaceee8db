"""Shared fixtures: tiny models saved once per session, and a fresh local Hub per test."""

from __future__ import annotations

import os

import pytest
import torch

from tests import tiny
from tests.hubserver import local_hub

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A function arch -> saved tiny model folder ("llama", "phi3", "qwen2", "gemma3", "llava")."""
    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[arch] = tiny.build_llava_phi3(out) if arch == "llava" else tiny.build_text_model(arch, out)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to other processes on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def hub(request, monkeypatch, tmp_path):
    """A fresh local Hub (tests.hubserver.local_hub), signed in with the test module's own ``TOKEN``."""
    with local_hub(monkeypatch, tmp_path, request.module.TOKEN) as server:
        yield server
