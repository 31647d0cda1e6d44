"""rocketqa-ray: the RocketQA dense-retrieval recipe on Ray Train, Ray Data, Ray Serve and FAISS."""

__version__ = "0.1.0"
