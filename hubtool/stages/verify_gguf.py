"""The GGUF entry of verify: llama.cpp loads the file hubtool wrote, and its logits are compared.

llama.cpp is the one built by ``scripts/install_llama_cpp.sh`` (``make llama-cpp``) from the sdist of
llama-cpp-python, found through ``$HUBTOOL_LLAMA_CPP`` (the install folder) or in
``$HUBTOOL_CACHE/llama.cpp/<version>/``. Its probe ``llama-logits`` (``scripts/llama_logits.cpp``, linked
against that build's libllama) runs in a subprocess: every prompt's token ids (hubtool's tokenizer, so
that the check is about the weights and the arithmetic) are decoded in one batch, logits kept at every
position, and a few tokens generated greedily. The int4 layers reported are the model's linears whose tensor in the file is Q4_0 (types read
from the file by the ``gguf`` package, names through the export's ``gguf_tensors.json``).

llama.cpp's CPU Q4_0 matmul quantizes each activation row to Q8_0 (int8 per 32 values) before the dot
product, so its logits differ from the fp32 reference by more than summation order: ``LLAMA_CPP_BOUND``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import cache_root
from ..errors import HubtoolError

LLAMA_CPP_PY_VERSION = "0.3.36"  # scripts/install_llama_cpp.sh's default
LLAMA_CPP_ENV = "HUBTOOL_LLAMA_CPP"
# Max |logits - reference| / max |reference logits| for llama.cpp against hubtool's fp32 reference. The
# weights are the same numbers (tests/test_gguf.py checks every block bit for bit); the activations are
# rounded to Q8_0 (1/127 of each 32-block's largest value) at every Q4_0 matmul. Measured (RTN, the two
# text prompts): tiny random Llama 1.25e-2; SmolLM2-135M (30 layers) 5.09e-2 with top-1 1.000 at every
# position. Provisional: not yet measured on Gemma 3 270M, nor split into what Q8_0 activations explain.
LLAMA_CPP_BOUND = 0.08
CHILD_TIMEOUT_S = 900


def llama_cpp_home() -> Path | None:
    """The folder of a complete llama.cpp build (``env`` file inside), or None when none is installed."""
    given = os.environ.get(LLAMA_CPP_ENV)
    if given:
        return Path(given) if (Path(given) / "env").is_file() else None
    root = cache_root() / "llama.cpp"
    pinned = root / LLAMA_CPP_PY_VERSION
    if (pinned / ".complete").is_file():
        return pinned
    found = sorted(p.parent for p in root.glob("*/.complete")) if root.is_dir() else []
    return found[-1] if found else None


def llama_cpp_env(home: Path) -> dict[str, str]:
    """The ``env`` file of a build as a dict (LLAMA_CPP_BIN, LLAMA_CPP_LIB_PATH, LLAMA_CPP_PYTHONPATH, ...)."""
    out = {}
    for line in (home / "env").read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("=")
        if key.strip():
            out[key.strip()] = value.strip()
    return out


def llama_cpp_version(home: Path) -> str:
    """llama-cpp-python's version and the vendored llama.cpp version, e.g. "0.3.36 (llama.cpp 0.5.0-dev)"."""
    env = llama_cpp_env(home)
    text = (home / "version.txt").read_text(errors="replace") if (home / "version.txt").is_file() else ""
    build = next(
        (ln.split(":", 1)[1].strip().split(" ")[0] for ln in text.splitlines() if "version:" in ln), ""
    )
    return env.get("LLAMA_CPP_PY_VERSION", "?") + (f" (llama.cpp {build})" if build else "")


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file through transformers' GGUF reader (every tensor dequantized by the
    ``gguf`` package, into ``dtype``), with the attention scale llama.cpp computes for this architecture
    (transformers' reader defaults Gemma 3's query_pre_attn_scalar; the file means head_dim)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..formats.gguf import llama_cpp_attention_scale

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    scale = llama_cpp_attention_scale(model.config)
    if scale is not None:
        for module in model.modules():
            if hasattr(module, "scaling") and type(module).__name__.endswith("Attention"):
                module.scaling = scale
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def gguf_file(folder: Path) -> Path | None:
    """The one .gguf file of a format folder."""
    files = sorted(Path(folder).glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def int4_modules(folder: Path) -> list[str]:
    """The model's linears stored as a 4-bit type in the file (types from the file, names from the listing)."""
    from gguf import GGUFReader

    listing = json.loads((Path(folder) / "gguf_tensors.json").read_text(encoding="utf-8"))
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(gguf_file(folder))).tensors}
    return sorted(
        t["source"]
        for t in listing["tensors"]
        if t.get("tuned", True) and types.get(t["name"], "") in ("Q4_0", "Q4_K")
    )


def run_llama_cpp(loader: Any, job: dict[str, Any]) -> dict[str, Any]:
    """verify's loader for GGUF: llama.cpp (the ``llama-logits`` probe) in a subprocess; what check_format reads."""
    result: dict[str, Any] = {"library": loader.library, "version": "?", "device": "cpu", "dtype": "float32"}
    result["bound"] = LLAMA_CPP_BOUND
    home = llama_cpp_home()
    if home is None:
        result["error"] = ["library", "llama.cpp is not installed (run `make llama-cpp`)"]
        return result
    result["version"] = llama_cpp_version(home)
    folder = Path(job["folder"])
    path = gguf_file(folder)
    if path is None:
        result["error"] = ["load", f"{folder} does not hold exactly one .gguf file"]
        return result
    try:
        result["modules"] = int4_modules(folder)
    except (OSError, ValueError, KeyError) as exc:
        result["error"] = ["load", f"cannot read the GGUF's tensor types: {exc}"]
        return result
    from safetensors.torch import load_file

    inputs = load_file(job["inputs"])
    prompts = [
        inputs[f"{i}.input_ids"].reshape(-1).tolist()
        for i in range(len(inputs))
        if f"{i}.input_ids" in inputs
    ]
    try:
        got = run_probe(home, path, prompts, job["new_tokens"])
    except HubtoolError as exc:
        result["error"] = ["load", exc.message]
        return result
    result["logits"] = {str(i): t for i, t in enumerate(got.logits)}
    result["greedy"] = got.greedy
    result["generated"] = len(got.greedy[0]) if got.greedy else 0
    return result


@dataclass
class ProbeResult:
    """What llama.cpp computed for each prompt: logits at every position (float32) and its greedy tokens."""

    logits: list[torch.Tensor]
    greedy: list[list[int]]


def run_probe(
    home: Path, gguf: Path, prompts: list[list[int]], new_tokens: int, threads: int = 2
) -> ProbeResult:
    """Evaluate token ids in llama.cpp with ``llama-logits``; one-line HubtoolError when it fails."""
    probe = Path(llama_cpp_env(home).get("LLAMA_CPP_BIN", home / "build" / "bin")) / "llama-logits"
    with tempfile.TemporaryDirectory(prefix="hubtool-llama-") as tmp:
        out = Path(tmp) / "logits.f32"
        text = "".join(" ".join(map(str, p)) + "\n" for p in prompts)
        try:
            done = subprocess.run(
                [str(probe), str(gguf), str(out), str(new_tokens), str(threads)],
                input=text,
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HubtoolError(f"llama.cpp: {exc}") from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]
            raise HubtoolError(f"llama.cpp: {tail}")
        lines = done.stdout.splitlines()
        n_vocab = int(lines[0].split()[1])
        flat = torch.from_numpy(np.fromfile(out, dtype=np.float32))
    logits, at = [], 0
    for p in prompts:
        logits.append(flat[at : at + len(p) * n_vocab].reshape(len(p), n_vocab).clone())
        at += len(p) * n_vocab
    greedy = [[int(t) for t in ln.split()[1:]] for ln in lines[1:] if ln.startswith("greedy")]
    return ProbeResult(logits, greedy)


def tokenize(home: Path, gguf: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's token ids for each text (the model's special tokens added, as llama-cli does)."""
    probe = Path(llama_cpp_env(home).get("LLAMA_CPP_BIN", home / "build" / "bin")) / "llama-logits"
    text = "".join(t.replace("\n", "\\n") + "\n" for t in texts)  # the probe reads \n back as a newline
    done = subprocess.run([str(probe), str(gguf), "--tokenize"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise HubtoolError(f"llama.cpp could not tokenize with {gguf.name}")
    return [[int(t) for t in ln.split()[1:]] for ln in done.stdout.splitlines() if ln.startswith("tokens")]
