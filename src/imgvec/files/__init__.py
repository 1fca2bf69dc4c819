"""Every byte imgvec reads or writes, checked before it is trusted.

Owns: the artifact header and its checks (``artifact``), the provenance value object and its gate
(``provenance``), bounded walks of HDF5 heaps, chunk indexes and FAISS blobs (``h5heap``, ``chunks``,
``faissblob``), the embed journal (``journal``), a store writer's lock (``lock``) and image files (``images``).
May import: the backbone registry (data), ``fileio`` (race-free opening, atomic publish), ``checks``,
``progress``, ``versions`` and ``errors``; never the runtime, the vectors, the pipeline, the api or a face.
"""
