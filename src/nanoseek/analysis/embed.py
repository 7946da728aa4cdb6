"""Sentence vectors: a scalar mix of every layer's output, mean-pooled over the tokens.

    e(text) = normalize( mean_t  gamma * sum_j softmax(w)_j RMSNorm(X_j)[t] )

X_0 is the embedding layer and X_j the output of block j; the mix weights live in the checkpoint
(`scalar_mix.logits`, uniform unless tuned). Vectors are L2-normalized, so cosine similarity is a
dot product.

    >>> from nanoseek import ModelConfig, Transformer
    >>> from nanoseek.data.tokenizer import CharTokenizer
    >>> tokenizer = CharTokenizer.train(["to be or not to be"])
    >>> model = Transformer(ModelConfig.from_preset("gpt2-tiny").replace(vocab_size=tokenizer.vocab_size)).eval()
    >>> vecs = embed(model, tokenizer, ["to be", "or not to be"])
    >>> vecs.shape, round(float(vecs[0].norm()), 4)
    (torch.Size([2, 64]), 1.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.errors import NanoseekError


@torch.inference_mode()
def embed(model, tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    if isinstance(texts, str):
        texts = [texts]
    limit = max_tokens or model.config.max_position_embeddings
    vectors = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)[:limit]
        if not ids:
            raise NanoseekError(f"text {i} is empty; nothing to embed")
        outputs = model.layer_outputs(torch.tensor([ids]))
        mixed = model.scalar_mix(outputs)  # (1, T, D)
        vectors.append(F.normalize(mixed.mean(1).float(), dim=-1)[0])
    return torch.stack(vectors)
