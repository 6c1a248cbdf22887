"""Configuration of a nanochat model exported to Hugging Face format (`nanochat export hf`).

Self-contained (only transformers): it is loaded with `trust_remote_code=True`. The fields are
those of nanochat's GPTConfig; the standard transformers names (hidden_size, ...) are aliases.
"""
from transformers import PretrainedConfig


class NanochatConfig(PretrainedConfig):
    model_type = "nanochat"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",
    }

    def __init__(self, sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 window_pattern="SSSL", short_window=0, softcap=15.0, rope_base=100000.0,
                 ve_gate_channels=12, ve_gate_range=3.0, qk_scale=1.2, smear=True, smear_channels=24,
                 backout=True, use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 tie_word_embeddings=False, **kwargs):
        self.sequence_len = sequence_len
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern
        # nanochat resolves 0 to sequence_len // 4 when it builds the model; the export writes the resolved value
        self.short_window = short_window if short_window > 0 else max(1, sequence_len // 4)
        self.softcap = softcap
        self.rope_base = rope_base
        self.ve_gate_channels = ve_gate_channels
        self.ve_gate_range = ve_gate_range
        self.qk_scale = qk_scale
        self.smear = smear
        self.smear_channels = smear_channels
        self.backout = backout
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_windows(self):
        """Per layer: how many tokens a query may see (itself included); None = full context.
        The pattern ("SSSL": S = short window, L = full) is tiled over the layers; the last layer
        always sees everything."""
        pattern = self.window_pattern.upper()
        windows = [self.short_window if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
        windows[-1] = None
        return windows
