"""Write a seeded random-weight model with the published shapes of Llama-3.2-3B or Llama-3.1-8B.

    python scripts/make_shaped.py llama-3.2-3b OUT_DIR [--seed 0] [--max-shard-size 5GB]

The folder loads like the real model (config.json, bf16 shards with model.safetensors.index.json, a
tokenizer, generation_config.json), so that quantizing, exporting, loading and decoding can be measured at
size without downloading it. Nothing is built in memory as a whole: names and shapes come from a model
built on the meta device, each tensor is drawn from its own generator (seeded by --seed and its name) a few
MB at a time and written straight into its shard, whose safetensors header is computed from the shapes
first. Peak memory is that of torch plus one chunk, whatever the model's size or the shard size. Same
seed, same bytes. The tokenizer is a byte-level BPE of 8192 tokens (the model's vocabulary is larger, as
Llama 3's embedding has unused rows too); the model's bos/eos ids are its special tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import resource
import struct
import sys
import time
from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3_ROPE_POSITIONS = {"original_max_position_embeddings": 8192}
# The published config.json values (meta-llama/Llama-3.2-3B, meta-llama/Llama-3.1-8B).
PRESETS: dict[str, dict] = {
    "llama-3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={**LLAMA3_ROPE, "factor": 32.0, **LLAMA3_ROPE_POSITIONS},
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={**LLAMA3_ROPE, "factor": 8.0, **LLAMA3_ROPE_POSITIONS},
    ),
}
STD = 0.02  # Llama's initializer_range; trained Llama 3 projections have about this spread
CHUNK_ELEMENTS = 1 << 22  # values drawn at a time (16 MB in fp32)
TOKENIZER_VOCAB = 8192
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (GB = 10^9 as in transformers, GiB = 2^30); a plain number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def make_config(preset: str, overrides: dict | None = None):
    """The LlamaConfig of a preset, with overrides (e.g. fewer layers) applied."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown shape {preset!r}: use one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **(overrides or {})}
    cfg = LlamaConfig(**values, bos_token_id=0, eos_token_id=1, pad_token_id=None, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def tensor_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint holds, in the model's order (tied weights once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    specs = [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # tied: the first name only
    extra = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if extra:
        raise ValueError(f"persistent buffers are not generated: {sorted(extra)}")
    return specs


def plan_shards(specs, max_shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the tensors, in order, into shards of at most max_shard_size bytes (a larger tensor alone)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _header(tensors) -> bytes:
    """The safetensors header for bf16 tensors written in name order, laid out as safetensors' own writer does."""
    entries, offset = {}, 0
    for name, shape in sorted(tensors):
        end = offset + 2 * _numel(shape)
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator of its own for each tensor, seeded by the run's seed and the tensor's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _write_tensor(f, name: str, shape, seed: int) -> None:
    """Draw one tensor chunk by chunk (normal(0, STD) for matrices, ones for norms) and append its bf16 bytes."""
    if len(shape) == 1:
        f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    gen = _generator(seed, name)
    cols = _numel(shape[1:])
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        chunk = torch.randn((rows, cols), generator=gen).mul_(STD).to(torch.bfloat16)
        f.write(chunk.view(torch.int16).numpy().data)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE (trained on the standard library's pydoc topics, no download) with Llama 3's specials."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(TOKENIZER_VOCAB, vocab_size),
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def make_shaped(
    preset: str, out: Path, seed: int = 0, max_shard_size: int = 5 * 10**9, overrides: dict | None = None
) -> Path:
    """Write the model folder; return it. OUT must be missing or empty."""
    from transformers import GenerationConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(preset, overrides)
    shards = plan_shards(tensor_specs(cfg), max_shard_size)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with open(out / fname, "wb") as f:
            f.write(_header(tensors))
            for name, shape in sorted(tensors):
                _write_tensor(f, name, shape, seed)
                weight_map[name] = fname
                total += 2 * _numel(shape)
    params = total // 2
    index = {
        "metadata": {"total_parameters": params, "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id).save_pretrained(out)
    write_tokenizer(out, cfg.vocab_size)
    return out


def _override(text: str) -> tuple[str, object]:
    """'num_hidden_layers=2' -> ('num_hidden_layers', 2); the value is read as JSON when it parses."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, write the model, print where, how long and the peak RSS."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(PRESETS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default="5GB", help="largest shard (5GB = 5*10^9 bytes; GiB also)")
    ap.add_argument("--shape-override", action="append", default=[], type=_override, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        size = parse_size(args.max_shard_size)
    except ValueError as exc:
        ap.error(str(exc))
    t0 = time.perf_counter()
    try:
        out = make_shaped(args.shape, args.out, args.seed, size, dict(args.shape_override))
    except (FileExistsError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n_files = len(set(index["weight_map"].values()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.shape}: {index['metadata']['total_parameters'] / 1e9:.2f}B parameters, "
        f"{index['metadata']['total_size'] / 1e9:.2f} GB in {n_files} shards, {out}"
    )
    print(f"wall {time.perf_counter() - t0:.1f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
