"""`stepvox serve`: an OpenAI-compatible speech server (FastAPI + uvicorn) over one TTS.

    from stepvox.server import ServerConfig, bind_socket, create_app, serve
    app = create_app(tts, ServerConfig(api_key="..."))                 # an ASGI app for any server
    serve(tts, ServerConfig(), bind_socket("127.0.0.1", 8000))          # uvicorn, graceful SIGTERM

Layout: config.py (ServerConfig), app.py (the factory and the middlewares), routes.py, schemas.py
(pydantic bodies), speech.py (admission, one request's stream), encoders.py (streamed formats),
instructions.py (OpenAI's `instructions` -> tags), errors.py (OpenAI-shaped errors), metrics.py
(Prometheus), runner.py (uvicorn).
"""
from .app import create_app
from .config import ServerConfig
from .runner import bind_socket, serve

__all__ = ["ServerConfig", "create_app", "serve", "bind_socket"]
