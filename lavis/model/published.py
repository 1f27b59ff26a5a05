"""The published shapes of the LLMs the shipped model configs name, for planning before any download.

``python -m lavis.plan`` estimates memory from these when the recipe's ``model.llm.path`` holds no ``config.json``
yet; ``lavis.testing.synthetic`` writes synthetic weight files of these shapes. Sources are named per entry.
"""

from __future__ import annotations

from typing import Any

_QWEN_V1_COMMON = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "kv_channels": 128, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "layer_norm_epsilon": 1e-6, "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True,
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
}
_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "vocab_size": 32000,
}
PUBLISHED_LLM_CONFIGS: dict[str, dict[str, Any]] = {
    # docs/FORMATS.md section 5 (Sep-2023 layout)
    "qwen7b_chat": {**_QWEN_V1_COMMON, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "intermediate_size": 22016, "vocab_size": 151936, "seq_length": 8192,
                    "max_position_embeddings": 8192},
    # docs/FORMATS.md section 6
    "qwen14b_chat": {**_QWEN_V1_COMMON, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                     "intermediate_size": 27392, "vocab_size": 152064, "seq_length": 2048,
                     "max_position_embeddings": 8192},
    "vicuna0_7b": {**_LLAMA_COMMON, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "intermediate_size": 11008},
    # Llama-2-7b-chat-hf's published config.json
    "minigpt4_llama2": {**_LLAMA_COMMON, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 32, "intermediate_size": 11008, "max_position_embeddings": 4096,
                        "rms_norm_eps": 1e-5},
    "vicuna0_13b": {**_LLAMA_COMMON, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                    "num_key_value_heads": 40, "intermediate_size": 13824},
    "qwen2.5_7b_instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "hidden_act": "silu",
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
        "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645},
    # Qwen3-8B's published config.json
    "qwen3_8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
        "vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "use_sliding_window": False,
        "max_window_layers": 36, "bos_token_id": 151643, "eos_token_id": 151645},
    # Llama-3.1-8B-Instruct's published config.json
    "llama3.1_8b_instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009]},
}
"""The published ``config.json`` of each shipped model config's LLM (``lavis/projects/models/NAME.yaml``)."""
