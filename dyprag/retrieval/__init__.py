"""Retrieval: passage and question embeddings, a FAISS dense index, BM25, and the retriever
that answers with either or fuses both."""
