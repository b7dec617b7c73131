"""`zspa-serve`: the bundle behind OpenAI's chat-completions API (FastAPI + uvicorn, no torch)."""
