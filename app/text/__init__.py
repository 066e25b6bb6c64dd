"""Text models served without transformers: tokenization with the `tokenizers` library, and the answers each
task gives (embeddings, labels with scores, entities)."""
