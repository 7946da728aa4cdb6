"""The model: one module per concept (see each module's docstring for its equation)."""

from nanoseek.model.transformer import ModelOutput, Transformer, kv_cache_bytes_per_token, model_info

__all__ = ["ModelOutput", "Transformer", "kv_cache_bytes_per_token", "model_info"]
