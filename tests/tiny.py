"""Tiny models of real architectures, built from configs with random weights, saved as local model folders."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<image>"]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """A small byte-level BPE trained on the standard library's pydoc topics (no download)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = list(topics.values())[:200]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def make_tokenizer():
    """A PreTrainedTokenizerFast with a chat template and the tiny BPE vocabulary."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


VOCAB = 512


def _text_config(arch: str, layers: int = 2, hidden: int = 128, inter: int = 256, **extra):
    from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=7,
        pad_token_id=3,
        **extra,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "phi3":
        return Phi3Config(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "gemma3":
        # query_pre_attn_scalar = head_dim, as in every Gemma 3 but the 27B (and what llama.cpp assumes)
        common.setdefault("query_pre_attn_scalar", 32)
        common.setdefault("sliding_window", 64)
        return Gemma3TextConfig(**common, head_dim=32, tie_word_embeddings=True)
    raise ValueError(arch)


TEXT_ARCHS = ("llama", "phi3", "qwen2", "gemma3")


def build_text_model(
    arch: str, out: Path, layers: int = 2, hidden: int = 128, inter: int = 256, seed: int = 0, **extra
) -> Path:
    """Save a tiny random causal LM of the given architecture (bf16 safetensors + tokenizer) to ``out``
    (``extra``: more config fields)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    cfg = _text_config(arch, layers, hidden, inter, **extra)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    _scale_init(model)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=7, pad_token_id=3)
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return Path(out)


def build_llava_phi3(out: Path, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny LLaVA (CLIP vision tower + Phi-3 text model), the shape of Phi-3.5-vision, with its processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    text = _text_config("phi3", layers)
    tok = make_tokenizer()
    image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    _scale_init(model)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=7, pad_token_id=3)
    model.save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return Path(out)


def _scale_init(model: torch.nn.Module) -> None:
    """Give random linears a realistic spread (std 0.05) so int4 errors look like a real model's."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.05)
