"""Tiny random models of real transformers architectures, one per family, for the conformance suite.

Each entry is a config class name, its keyword arguments (hidden 32-64, 2 layers, vocab
128) and the model class; nothing here or in pipeline/ knows about a family beyond
that. Inputs are built from the model's `main_input_name` and config, so a new entry
needs no new code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
DECODER = dict(TEXT, num_key_value_heads=2, max_position_embeddings=64)


@dataclass(frozen=True)
class Arch:
    family: str
    config: str  # transformers config class
    model: str  # transformers model class (what config.json's `architectures` will name)
    kwargs: dict = field(default_factory=dict)


ARCHITECTURES = [
    Arch("llama", "LlamaConfig", "LlamaForCausalLM", DECODER),
    Arch("mistral", "MistralConfig", "MistralForCausalLM", dict(DECODER, sliding_window=16)),
    Arch("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=8)),
    Arch("phi3", "Phi3Config", "Phi3ForCausalLM", dict(DECODER, pad_token_id=0)),
    Arch("gemma2", "Gemma2Config", "Gemma2ForCausalLM", dict(DECODER, head_dim=8)),
    Arch("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", TEXT),
    Arch(
        "opt",
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
    ),
    Arch(
        "falcon",
        "FalconConfig",
        "FalconForCausalLM",
        dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    ),
    Arch(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    Arch("bloom", "BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    Arch(
        "mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(DECODER, num_local_experts=4, num_experts_per_tok=2),
    ),
    Arch(
        "qwen2_moe",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            DECODER,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        ),
    ),
    Arch("olmoe", "OlmoeConfig", "OlmoeForCausalLM", dict(DECODER, num_experts=4, num_experts_per_tok=2)),
    Arch(
        "t5",
        "T5Config",
        "T5ForConditionalGeneration",
        dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
    ),
    Arch("bert", "BertConfig", "BertForMaskedLM", dict(TEXT, max_position_embeddings=64)),
    Arch(
        "vit",
        "ViTConfig",
        "ViTForImageClassification",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            num_labels=3,
        ),
    ),
    Arch(
        "whisper",
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=32,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        ),
    ),
]

BY_FAMILY = {a.family: a for a in ARCHITECTURES}


def build(arch: Arch, dest: Path, shards: int = 2, seed: int = 0) -> Path:
    """save_pretrained of a random fp32 model into >= `shards` safetensors files."""
    import transformers

    config = getattr(transformers, arch.config)(**arch.kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model)(config).eval()
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(dest, max_shard_size=max(total // (shards + 1), 1))
    n = len(list(Path(dest).glob("*.safetensors")))
    assert n >= shards, f"{arch.family}: only {n} shards"
    return Path(dest)


def inputs_for(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs from the model's main_input_name and config (encoder-decoders get decoder ids)."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    name = model.main_input_name
    if name == "pixel_values":
        size = config.image_size
        out = {name: torch.randn(1, config.num_channels, size, size, generator=g)}
    elif name == "input_values":  # raw audio
        out = {name: torch.randn(1, 4000, generator=g)}
    elif name == "input_features":
        frames = 2 * config.max_source_positions
        out = {name: torch.randn(1, config.num_mel_bins, frames, generator=g)}
    else:
        out = {name: torch.randint(3, config.vocab_size, (1, 8), generator=g)}
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    if config.is_encoder_decoder:
        out["decoder_input_ids"] = torch.full((1, 3), config.decoder_start_token_id, dtype=torch.long)
    return out


def is_text_model(model) -> bool:
    return model.main_input_name == "input_ids"
