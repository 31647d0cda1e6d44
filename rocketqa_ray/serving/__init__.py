"""The search service's Ray-free core (serve/app.py wraps it in Ray Serve deployments): artifacts of a RUN_DIR,
the components (query encoder, retriever, reranker), the HTTP API's request/response, the in-process service."""
