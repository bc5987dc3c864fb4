"""Answering in every mode (vanilla, RAG, PRAG, DyPRAG, DyPRAG+context) and the score reports."""
