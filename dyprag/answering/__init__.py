"""Answering in every mode of ``config.MODES`` (vanilla, RAG, PRAG, DyPRAG, and PRAG or DyPRAG
with the passages in the prompt too) and the score reports."""
