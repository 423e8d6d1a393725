"""The vector index (`index` stage) and every search over it: chunking, embedding, the Milvus
connection, building, dense / BM25 / hybrid search, and retrieval metrics."""
