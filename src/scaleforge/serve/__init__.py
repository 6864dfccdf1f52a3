"""Serving a trained run over HTTP: `batching` (the batcher), `model` (the model's contract), `app` (HTTP),
`server` (uvicorn, start-up and graceful shutdown)."""
