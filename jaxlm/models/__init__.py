"""Model families: decoder (GPT-2 / Llama style) and encoder (BERT style)."""
