"""Load one exported format with transformers as its users do, and report what verify checks.

It imports only torch, transformers and safetensors (hubtool only when the job asks for ``import hubtool``),
so that it also runs as a script in another environment: ``python verify_child.py JOB.json`` (e.g. one with
GPTQModel, which pins its own numpy). The job names the model folder, the Auto class, a safetensors file of
prompt inputs (``<i>.<name>`` per prompt) and where to write the result: ``<out>.json`` (library and
version, device, dtype, the int4 module names) and ``<out>.safetensors`` (each prompt's logits).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any


def int4_names(model: Any) -> list[str]:
    """Names of the modules that compute from int4 codes (they hold a ``qweight``, or are hubtool's Int4Linear)."""
    return sorted(
        n for n, m in model.named_modules() if hasattr(m, "qweight") or type(m).__name__ == "Int4Linear"
    )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def split_inputs(flat: dict[str, Any]) -> list[dict[str, Any]]:
    """``{"0.input_ids": t, "1.input_ids": u}`` -> ``[{"input_ids": t}, {"input_ids": u}]``."""
    out: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        i, name = key.split(".", 1)
        out.setdefault(int(i), {})[name] = value
    return [out[i] for i in sorted(out)]


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Load, list the int4 modules, compute every prompt's logits, generate a few tokens; never raises.

    The result's ``error`` is (check name, one line) when a step failed: "library", "load" or "generate".
    """
    from safetensors.torch import load_file

    result: dict[str, Any] = {"library": job["library"], "version": _version(job["dist"]), "device": "cpu"}
    for dist in job.get("needs", []):
        if importlib.util.find_spec(dist.replace("-", "_")) is None:
            result["error"] = ["library", f"{dist} is not installed"]
            return result
    t0 = time.perf_counter()
    try:
        if job.get("import_hubtool"):
            importlib.import_module("hubtool")
        import transformers

        cls = getattr(transformers, job["model_class"])
        model = cls.from_pretrained(job["folder"], device_map="cpu", **job.get("kwargs", {})).eval()
    except Exception as exc:  # any loader error is the finding, reported in one line
        result["error"] = ["load", _line(exc)]
        return result
    result["load_seconds"] = time.perf_counter() - t0
    return measure(model, split_inputs(load_file(job["inputs"])), job["new_tokens"], result)


def _line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def measure(
    model: Any, prompts: list[dict[str, Any]], new_tokens: int, result: dict[str, Any]
) -> dict[str, Any]:
    """Fill ``result`` with the int4 module names, each prompt's logits and the number of tokens generated."""
    import torch

    result["modules"] = int4_names(model)
    result["device"] = str(next(model.parameters()).device)
    logits: dict[str, Any] = {}
    try:
        with torch.inference_mode():
            for i, inputs in enumerate(prompts):
                dtype = next(model.parameters()).dtype
                inputs = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
                out = model(**inputs).logits[0]
                result["dtype"] = str(out.dtype).removeprefix("torch.")
                logits[str(i)] = out.float().contiguous()
    except Exception as exc:  # any runtime error is the finding
        result["error"] = ["logits", _line(exc)]
        return result
    result["logits"] = logits
    try:
        first = prompts[0]
        with torch.inference_mode():
            gen = model.generate(
                **first, max_new_tokens=new_tokens, do_sample=False, num_beams=1, min_new_tokens=1
            )
        result["generated"] = int(gen.shape[1] - first["input_ids"].shape[1])
    except Exception as exc:
        result["error"] = ["generate", _line(exc)]
    return result


def main(argv: list[str]) -> int:
    """Script entry: read the job, run it, write ``<out>.json`` and ``<out>.safetensors``."""
    from safetensors.torch import save_file

    job = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    result = run(job)
    logits = result.pop("logits", {})
    save_file(logits, job["out"] + ".safetensors")
    Path(job["out"] + ".json").write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
