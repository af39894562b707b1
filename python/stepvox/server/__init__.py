"""`stepvox serve`: an OpenAI-compatible speech and voice-chat server (FastAPI + uvicorn) over one
TTS, or one VoiceChat (chat model + TTS + ASR).

    from stepvox.server import ServerConfig, bind_socket, create_app, serve
    app = create_app(tts, ServerConfig(api_key="..."))                 # an ASGI app for any server
    serve(voice_chat, ServerConfig(), bind_socket("127.0.0.1", 8000))   # uvicorn, graceful SIGTERM

Layout: config.py (ServerConfig), app.py (the factory and the middlewares), routes.py (speech,
voices, models, health, metrics, the page), chat_routes.py (chat completions, transcriptions),
schemas.py (pydantic bodies), admission.py (the request queue), streaming.py (one streamed
response), speech.py and chat.py (the jobs those responses send), transcription.py, encoders.py
(streamed formats), instructions.py (OpenAI's `instructions` -> tags), errors.py (OpenAI-shaped
errors), metrics.py (Prometheus), runner.py (uvicorn), client.py (the HTTP client of `stepvox chat`).
"""
from .app import create_app
from .config import ServerConfig
from .runner import bind_socket, serve

__all__ = ["ServerConfig", "create_app", "serve", "bind_socket"]
