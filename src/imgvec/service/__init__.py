"""``imgvec serve``: the local service that keeps model, store and index loaded, and its HTTP face.

service (the store, snapshots, model worker, memory budget; no HTTP) <- app (Starlette: endpoints,
error handlers, middleware) <- server (the socket, uvicorn, connection limits, shutdown).
May import the api, results, pages and everything below them; nothing imports it but the CLI.
"""
