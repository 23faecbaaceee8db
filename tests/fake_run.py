"""A synthetic finished run folder (run.json + format files) for card and publish tests: no model, no torch.

Its figures are deliberately odd (e.g. 0.61378, 17.4231) so that a test can tell each number in a card
back to the record.
"""

from __future__ import annotations

import json
from pathlib import Path

from hubtool import record as rec
from hubtool.formats.table import FORMATS


def _write_format(out: Path, fmt: str, seed: int, weights_bytes: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_type": "llama",
        "quantization_config": {"quant_method": FORMATS[fmt].quant_method, "bits": 4},
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048, "fmt": fmt}) + "\n")
    rnd = bytes((i * 131 + seed * 7 + (i >> 8)) % 251 for i in range(weights_bytes))
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + rnd)


def make_run(
    run_dir: Path,
    *,
    variants: int = 2,
    formats: tuple[str, ...] = tuple(FORMATS),
    vlm: bool = False,
    evals: bool = True,
    source_kind: str = "hub",
    weights_bytes: int = 40_000,
    verified: bool = True,
) -> rec.RunRecord:
    """Write a finished run into ``run_dir`` and return its record (every format verified, unless not asked)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = ["int4"] if variants == 1 else [f"int4-calib{chr(97 + i)}" for i in range(variants)]
    if source_kind == "gguf":
        source = rec.SourceInfo(
            kind="gguf",
            name="/somewhere/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="ab" * 32,
            license="Apache-2.0",
            is_vlm=vlm,
            note="dequantized from GGUF: the dequantized weights are the 16-bit baseline",
        )
    else:
        source = rec.SourceInfo(
            kind="hub",
            name="acme/tiny-chat",
            revision="main",
            commit="c0ffee" * 6 + "abcd",
            license="apache-2.0",
            is_vlm=vlm,
            architecture="LlavaForConditionalGeneration" if vlm else "LlamaForCausalLM",
        )
    record = rec.RunRecord(
        source=source,
        spec={"bits": 4, "group_size": 128, "sym": True, "method": "signround", "formats": list(formats)},
        hubtool_version="0.1.0",
        created_at="2026-11-26T19:00:00+00:00",
        command=["hubtool", "quantize", source.name, "-o", "runs/x", "--recipe", "light"],
        libraries={"torch": "2.13.0", "transformers": "5.23.0"},
        hardware={"cpu": "Test CPU", "cpus": 2, "memory_gb": 23.4, "platform": "Linux-x86_64"},
        timings={"load": 3.217, "total": 97.531},
        peak_rss_bytes=3_380_000_000,
    )
    for i, name in enumerate(names):
        v = rec.VariantRecord(
            name=name,
            method="signround",
            recipe={
                "name": "light",
                "iters": 50,
                "nsamples": 128,
                "seqlen": 256,
                "batch_size": 8,
                "lr": 0.005,
                "seed": 42,
                **({"weight_grad": "int8"} if i == 0 else {}),  # the second variant: a record without it
            },
            calibration=rec.CalibrationInfo(
                name=f"calib{chr(97 + i)}",
                source="builtin:pydoc_data.topics" if i == 0 else "acme/calib-set",
                nsamples=128,
                seqlen=256,
                batch_size=8,
                builtin=i == 0,
            ),
            quantized=["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"],
            skipped=[rec.SkippedLayer("model.layers.0.mlp.gate_proj", "in_features not a multiple of 128")],
            seconds=41.7 + i,
            peak_rss_bytes=2_150_000_000,
        )
        for j, fmt in enumerate(formats):
            rel = f"formats/{fmt}" if variants == 1 else f"formats/{name}/{fmt}"
            _write_format(run_dir / rel, fmt, seed=10 * i + j, weights_bytes=weights_bytes)
            v.formats.append(
                rec.FormatRecord(
                    fmt, rel, FORMATS[fmt].quant_method, rec.file_records(run_dir / rel, run_dir)
                )
            )
        record.variants.append(v)
    image = None
    if vlm:
        from PIL import Image

        (run_dir / "images").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (200, 30, 30)).save(run_dir / "images" / "prompt-2.png")
        image = "images/prompt-2.png"
    models = ["bf16", *names]
    record.comparisons.append(
        rec.PromptComparison(
            prompt="Explain int4 in two sentences.",
            max_new_tokens=48,
            generations=[
                rec.Generation(m, f"Answer of {m}: weights use four bits.", 9 + k, 0.812 + k, 11.0837 + k)
                for k, m in enumerate(models)
            ],
            agreements=[
                rec.Agreement(m, k == 0, None if k == 0 else 3, 1.0 if k == 0 else 0.3333)
                for k, m in enumerate(names)
            ],
        )
    )
    if vlm:
        record.comparisons.append(
            rec.PromptComparison(
                prompt="Describe this image.",
                image=image,
                image_source="hubtool:default.png",
                max_new_tokens=32,
                generations=[rec.Generation(m, "A red square.", 4, 0.5, 8.0) for m in models],
                agreements=[rec.Agreement(m, True, None, 1.0) for m in names],
            )
        )
    if evals:
        vals = {"bf16": (0.61378, 17.4231), names[0]: (0.59312, 18.0917)}
        if len(names) > 1:
            vals[names[1]] = (0.60044, 17.8862)
        for m, (acc, ppl) in vals.items():
            record.evals.append(
                rec.TaskResult("arc_easy", "mcq", "acc", m, acc, 0.0213, 200, True, {"primary": True})
            )
            record.evals.append(
                rec.TaskResult(
                    "heldout", "perplexity", "perplexity", m, ppl, None, 37, False, {"primary": True}
                )
            )
    if verified:
        mark_verified(record)
    rec.save(record, run_dir)
    return record


def mark_verified(record: rec.RunRecord) -> None:
    """Give every format of ``record`` a passing verify result for its files as recorded now (not saved)."""
    record.verify = [
        rec.VerifyResult(
            v.name,
            f.name,
            library=FORMATS[f.name].loads_with,
            version="9.8.7",
            device="cpu",
            passed=True,
            files=rec.format_fingerprint(f),
        )
        for v in record.variants
        for f in v.formats
    ]
