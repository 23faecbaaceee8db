"""Quantizing under a real memory limit below the model's 16-bit size (issue 18 item 6).

A Llama-shaped model of 1.47 GB in bf16 is quantized inside a cgroup v1 memory limit of 1200 MiB
(no swap here; ``memory.memsw`` is capped too where it exists), and its exports are compared byte for
byte with an unlimited run. A control shows the limit bites: loading the same model whole under it is
killed. Needs root and a writable ``/sys/fs/cgroup/memory``; skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CGROUP = Path("/sys/fs/cgroup/memory")
LIMIT = 1200 * 2**20
SHAPE = dict(  # 734 M parameters: 1.47 GB in bf16, blocks of 37.7 M, embedding and head of 65.5 M each
    num_hidden_layers=16,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)

pytestmark = pytest.mark.slow


def _cgroup(name: str, limit: int) -> Path:
    """A fresh cgroup v1 memory group with ``limit`` (skip the test where that is not possible)."""
    if sys.platform != "linux" or not (CGROUP / "memory.limit_in_bytes").is_file():
        pytest.skip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    if not os.access(CGROUP, os.W_OK):
        pytest.skip("cgroup v1 memory limits need root here")
    group = CGROUP / f"{name}-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    if (group / "memory.memsw.limit_in_bytes").is_file():
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
    return group


def _run_in(group: Path | None, args: list[str]) -> subprocess.CompletedProcess:
    """Run ``python args...`` (one thread pool of 2), inside ``group`` when given."""
    cmd = [sys.executable, *args]
    if group is not None:
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".safetensors", ".json")
    }


@pytest.fixture(scope="module")
def shaped(tmp_path_factory) -> Path:
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_shaped.py"
    spec = importlib.util.spec_from_file_location("make_shaped", script)
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    out = tmp_path_factory.mktemp("shaped") / "model"
    return ms.make_shaped("llama-3.1-8b", out, max_shard_size=400 * 10**6, overrides=SHAPE)


def test_quantize_under_a_limit_below_the_16bit_size(shaped, tmp_path):
    size = sum(p.stat().st_size for p in shaped.glob("*.safetensors"))
    assert size > 1.1 * LIMIT  # the 16-bit weights cannot all be in memory under the limit
    group = _cgroup("hubtool-limit", LIMIT)
    try:
        runs = {}
        for where, g in (("free", None), ("limited", group)):
            out = tmp_path / where
            args = ["-m", "hubtool", "quantize", str(shaped), "-o", str(out), "--method", "rtn"]
            done = _run_in(g, [*args, "--formats", "auto_round,hubtool"])
            assert done.returncode == 0, done.stderr[-2000:]
            runs[where] = _digests(out / "formats")
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        assert peak <= LIMIT
        assert len(runs["free"]) >= 6 and runs["limited"] == runs["free"]
        # the control: the 16-bit weights held in memory (from_pretrained maps the file; clones own their
        # bytes, as a run that loads the model whole holds them) are killed under the same limit
        (group / "memory.max_usage_in_bytes").write_text("0")
        load = (
            "import torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained("
            f"{str(shaped)!r}, dtype=torch.bfloat16); held = [p.detach().clone() for p in m.parameters()]"
        )
        whole = _run_in(group, ["-c", load])
        assert whole.returncode == -9, "the 16-bit weights fit under the limit: it does not bite"
    finally:
        group.rmdir()
