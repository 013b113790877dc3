"""`flashinfer serve`: an OpenAI-compatible HTTP server over one Engine (the `server` extra).

protocol.py  OpenAI's request and response objects, checked (no HTTP)
app.py       the Starlette app: routes, the bounded queue, the engine thread, SSE
serve.py     binding the socket and running uvicorn
"""
