"""negspace controller: embeddings in Qdrant, exact dense-region sampling, diversity metrics."""

__version__ = "0.1.0"
