"""mmdisagg: vision-language serving with the vision encoder and the language model on separate
servers, moving prompt embeddings between them through a block-based pool."""

__version__ = "0.1.0"
