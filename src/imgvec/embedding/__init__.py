"""From image files to stored rows: batches through a backbone (``embedder``), folders into a store with a
journal and resume (``ingest``), and the same on Ray (``distributed``).

May import: ``runtime``, ``vectors``, ``files``, ``backbones`` and the leaves; never analyses, the api or a face.
"""
