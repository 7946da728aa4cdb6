"""The model: one module per concept (see each module's docstring for its equation).

`make_model(config)` builds the architecture the config names: `Transformer` (decoder-only) or
`EncoderDecoder` (model/encoder_decoder.py)."""

from nanoseek.config import ModelConfig
from nanoseek.model import encoder_decoder
from nanoseek.model.encoder_decoder import EncoderDecoder, EncoderMemory
from nanoseek.model.transformer import ModelOutput, Transformer, kv_cache_bytes_per_token
from nanoseek.model.transformer import model_info as decoder_model_info


def make_model(config: ModelConfig) -> Transformer | EncoderDecoder:
    """The model `config.architecture` names, freshly initialized (on the current default device)."""
    return EncoderDecoder(config) if config.architecture == "encoder_decoder" else Transformer(config)


def model_info(config: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameters, KV-cache bytes and FLOPs per token of the model `config` describes (on the meta device)."""
    if config.architecture == "encoder_decoder":
        return encoder_decoder.model_info(config, seq_len)
    return decoder_model_info(config, seq_len)


__all__ = [
    "EncoderDecoder",
    "EncoderMemory",
    "ModelOutput",
    "Transformer",
    "kv_cache_bytes_per_token",
    "make_model",
    "model_info",
]
