"""The OpenAI-compatible server: request bodies, the decoding engine thread, the FastAPI app."""
