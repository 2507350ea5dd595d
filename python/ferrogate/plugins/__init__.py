"""First-party plugins: the request and response transformers, CORS, request termination."""
