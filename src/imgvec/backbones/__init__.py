"""What each backbone is (``registry``: pure data) and how Keras builds it (``builder``, ``device``).

May import: ``checks``, ``errors`` and ``versions``; never files, runtimes or anything above.
"""
