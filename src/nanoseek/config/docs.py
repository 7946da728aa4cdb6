"""What each config field means: the comment on its line in the dataclass, read from the source.

The comments beside the fields of `ModelConfig` and the `TrainConfig` sections are the one place a
field is explained; `field_docs` reads them (with `ast` for the fields and `tokenize` for the
comments) and `describe` lays a whole config out section by section, each field with its value and
meaning, for `nanoseek config`. A test checks that every field has one.

    >>> from nanoseek.config import ModelConfig
    >>> field_docs(ModelConfig)["hidden_size"]
    'width d of the residual stream'
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize

from nanoseek.config.train import TrainConfig


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field name: the comment on its line} of dataclass `cls` ("" where it has none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    (node,) = ast.parse(source).body
    docs = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            lines = range(item.lineno, (item.end_lineno or item.lineno) + 1)
            docs[item.target.id] = next((comments[n] for n in lines if n in comments), "")
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def describe(cfg: TrainConfig) -> list[tuple[str, str, list[tuple[str, object, str]]]]:
    """[(section, what it holds, [(field, value, meaning), ...]), ...] for every field of `cfg`; the
    first section, "", holds the top-level fields (preset, out)."""
    top = field_docs(TrainConfig)
    sections: list = [("", "the run", [])]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            docs = field_docs(type(value))
            fields = [(g.name, getattr(value, g.name), docs[g.name]) for g in dataclasses.fields(value)]
            sections.append((f.name, top[f.name], fields))
        else:
            sections[0][2].append((f.name, value, top[f.name]))
    return sections
