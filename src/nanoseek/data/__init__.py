"""Text to training batches: tokenizers, token shards and their loader, file reading and writing,
and the corpora bundled with the package (tiny Shakespeare, Tang poems; provenance in data/README.md),
which `--data NAME` names."""

from nanoseek.data.corpora import CORPORA, corpus_path

BUNDLED_CORPUS = CORPORA["shakespeare"]

__all__ = ["BUNDLED_CORPUS", "CORPORA", "corpus_path"]
