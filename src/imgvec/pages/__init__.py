"""Tables and HTML pages made from result records (``report``, ``html`` and the Jinja2 ``templates``).

Pages take plain data: they may import ``results``, ``files`` (image thumbnails, provenance) and the
leaves, never the api, the pipeline, the runtime or the vectors.
"""
