"""Analyses over stored rows and heads: backbone comparison (``comparison``), near duplicates
(``duplicates``) and what is wrong with a store's images (``inspection``). May import everything below the
api; the api calls them.
"""
