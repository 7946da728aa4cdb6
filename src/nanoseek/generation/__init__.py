"""Generation: sampling.py (logits -> next token), loop.py (prefill, decode, the token loop,
`generate`), streaming.py (the detokenizer, stop strings, `TextStream`), compiled.py (compiled decode
and prefill, CUDA graphs), direct.py (the compiled step called past dynamo), speculative.py (MTP
self-speculative decoding), chat.py (templates, history, `Chat`)."""

from nanoseek.generation.chat import Chat, load_chat_template, render_chat, trim_history
from nanoseek.generation.compiled import (
    CompiledDecoder,
    DecodeOptions,
    compiled_prefill,
)
from nanoseek.generation.loop import TokenLoop, decode_step, generate, prefill
from nanoseek.generation.sampling import (
    Sampler,
    SamplingOptions,
    apply_repetition_penalty,
    mask_unknown_ids,
    sample_next,
    sample_rows,
    top_k_filter,
    top_p_filter,
)
from nanoseek.generation.speculative import speculative_generate
from nanoseek.generation.streaming import (
    Detokenizer,
    TextStream,
    complete,
    stream_past_context,
)

__all__ = [
    "Chat",
    "CompiledDecoder",
    "DecodeOptions",
    "Detokenizer",
    "Sampler",
    "SamplingOptions",
    "TextStream",
    "TokenLoop",
    "apply_repetition_penalty",
    "compiled_prefill",
    "complete",
    "decode_step",
    "generate",
    "load_chat_template",
    "mask_unknown_ids",
    "prefill",
    "render_chat",
    "sample_next",
    "sample_rows",
    "speculative_generate",
    "stream_past_context",
    "top_k_filter",
    "top_p_filter",
    "trim_history",
]
