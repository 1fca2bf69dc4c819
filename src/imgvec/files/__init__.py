"""Every byte imgvec reads or writes, checked before it is trusted.

Owns: opening a file and checking it against its partners (``artifact``), the header's schema, checksum and
version-1 migration (``header``), string reading (``strings``), HDF5 structure checks (``structure``), the
provenance value object and its gate (``provenance``), bounded walks of HDF5 heaps, chunk indexes and FAISS
blobs (``h5heap``, ``chunks``, ``faissblob``), the pinned format new files are written in (``h5format``), the
embed journal (``journal``), a store writer's lock (``lock``) and image files (``images``).
May import: the backbone registry (data), ``fileio`` (race-free opening, atomic publish), ``checks``,
``progress``, ``versions`` and ``errors``; never the runtime, the vectors, the pipeline, the api or a face.
"""
