"""Analyses over stored rows and heads: backbone comparison (``comparison``) and near duplicates
(``duplicates``). May import everything below the api; the api calls them.
"""
