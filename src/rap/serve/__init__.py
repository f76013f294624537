"""Serving under a live budget: the engine, its budget sources, weight residency, generation backends, the OpenAI
server, the cluster on Ray Serve and the demo."""
