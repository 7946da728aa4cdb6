"""The tokenizer files of an HF export, so that `AutoTokenizer` and `pipeline("text-generation")` work.

    tokenizer.json           the HF `tokenizers` format: a BPE tokenizer as it is; the char tokenizer as
                             a BPE vocabulary with byte fallback and no merges (same ids, same text)
    tokenizer_config.json    tokenizer class, special tokens, context length, no clean-up of spaces,
                             special-token strings in text kept as text (as nanoseek encodes them),
                             and the chat template
    special_tokens_map.json  bos / eos / pad token strings
    generation_config.json   bos / eos / pad ids (generation stops at eos, as `nanoseek sample` does)

Files the source folder already has (an HF checkpoint fine-tuned in nanoseek, say) are kept; what they
lack is filled in. A tokenizer nanoseek does not run itself is passed on with its files as they are.
The chat template is the source's (tokenizer_config.json or chat_template.jinja), else the plain
transcript `nanoseek chat` renders for models without one (`PLAIN_CHAT_TEMPLATE`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import CharTokenizer, load_tokenizer
from nanoseek.errors import NanoseekError

# generation/chat.py's plain transcript ("User: Hi\nAssistant:") as a Jinja chat template
PLAIN_CHAT_TEMPLATE = (  # newlines as expressions: chat templates render with trim_blocks
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif %}"
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def write_hf_tokenizer(src: Path, dst: Path, config: ModelConfig) -> dict:
    """Write the tokenizer files of folder `src` into `dst`; return the tokenizer's special ids
    ({"bos_token_id", "eos_token_id", "pad_token_id"}; {} when `src` has no tokenizer.json)."""
    if not (src / "tokenizer.json").is_file():
        return {}
    try:
        tok = load_tokenizer(src / "tokenizer.json")
    except NanoseekError:  # a tokenizer nanoseek does not run (e.g. SentencePiece-style): pass it on as it is
        tok = None
    if isinstance(tok, CharTokenizer):
        (dst / "tokenizer.json").write_text(tok.to_hf_json_str())
    else:
        shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    if tok is None:
        for name in (
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "chat_template.jinja",
        ):
            if (src / name).is_file():
                shutil.copy(src / name, dst / name)
        return {}
    names = tok.special_token_names()
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}

    tokenizer_config = _read_json(src / "tokenizer_config.json")
    if not tokenizer_config:  # nanoseek's own tokenizers: encode typed special-token text as text
        tokenizer_config["split_special_tokens"] = True
    tokenizer_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for key, value in names.items():
        tokenizer_config.setdefault(key, value)
    tokenizer_config.setdefault("model_max_length", config.max_position_embeddings)
    tokenizer_config.setdefault("clean_up_tokenization_spaces", False)
    if (src / "chat_template.jinja").is_file():
        shutil.copy(src / "chat_template.jinja", dst / "chat_template.jinja")
    else:
        tokenizer_config.setdefault("chat_template", PLAIN_CHAT_TEMPLATE)
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))

    special_map = _read_json(src / "special_tokens_map.json") or dict(names)
    (dst / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))

    generation = _read_json(src / "generation_config.json") or dict(ids)
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return ids
