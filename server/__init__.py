"""patchserve's HTTP service: the OpenAI-compatible API, tenants and auth, the engine adapter.

Request path: :mod:`server.routes.chat` → :mod:`server.serving` → :mod:`server.engine`.
"""
