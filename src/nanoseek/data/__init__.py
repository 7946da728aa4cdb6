"""Text to training batches: tokenizers, token shards and their loader, file reading and writing,
and the corpus bundled with the package (tiny Shakespeare; provenance in data/README.md)."""

from pathlib import Path

BUNDLED_CORPUS = Path(__file__).resolve().parent / "tinyshakespeare.txt"
