"""Retrieval: dense (encode queries, search an index), BM25, and the reranker's score fusion."""
