"""What imgvec keeps of images: the embedding store, its FAISS index and the logistic head.

Each is a file (opened, checked and written through :mod:`imgvec.files`) and an object that
works on the rows. May import: ``files``, the backbone registry, ``checks``, ``progress``, ``errors``.
"""
