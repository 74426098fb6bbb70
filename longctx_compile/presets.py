"""Built-in tiny models: random weights from a fixed seed, for demos, tests and the equivalence zoo.

Every preset is ``tiny-<family>``: 2 layers, hidden 64, 4 query heads of dim 16 (2 KV heads where the
family has GQA), MLP 128, vocabulary 256, at most 512 positions. ``tiny-mistral`` and
``tiny-mixtral`` keep a sliding window of 8 tokens so the window mask is exercised at small lengths.
"""

from __future__ import annotations

from typing import Any

from .errors import LccError

SEED = 0
VOCAB = 256
MAX_POSITIONS = 512

_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=MAX_POSITIONS,
    tie_word_embeddings=False,
)

_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> config kwargs for ``transformers.AutoConfig.for_model``
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": 8},
    "qwen2": {**_LLAMA_LIKE, "use_sliding_window": False},
    "qwen3": _LLAMA_LIKE,
    "gemma": {**_LLAMA_LIKE, "hidden_act": "gelu_pytorch_tanh"},
    "olmo2": _LLAMA_LIKE,
    "starcoder2": {**_LLAMA_LIKE, "sliding_window": None},
    "mixtral": {**_LLAMA_LIKE, "sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2},
    "phi": {**_LLAMA_LIKE, "num_key_value_heads": 4, "partial_rotary_factor": 0.5},
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS),
    "gpt_neox": dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        rotary_pct=0.5,
    ),
    "opt": dict(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        word_embed_proj_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
    ),
    "falcon": dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        max_position_embeddings=MAX_POSITIONS,
    ),
}

PRESETS = {f"tiny-{name.replace('_', '-')}": name for name in FAMILIES}
DEFAULT_PRESET = "tiny-llama"


def preset_config(name: str, attn_implementation: str = "sdpa"):
    """The ``transformers`` config of a preset (no weights)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise LccError(f"unknown preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
    config = AutoConfig.for_model(PRESETS[name], **{**FAMILIES[PRESETS[name]], **_IDS})
    config._attn_implementation = attn_implementation
    return config


def build_preset(name: str, attn_implementation: str = "sdpa"):
    """A preset model with random weights from ``SEED``, in eval mode and fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(name, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()
