"""``imgvec serve``: the local service that keeps model, store and index loaded, and its HTTP app.

May import the api, results, pages and everything below them; nothing imports it but the CLI.
"""
