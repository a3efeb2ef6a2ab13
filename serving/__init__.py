"""OpenAI-compatible servers (vLLM, SGLang, transformers serve): the one HTTP client (client.py) and the
pipeline's steps run on a server with the local semantics and records (remote.py)."""
