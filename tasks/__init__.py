"""Thin Prefect task wrappers over ``gemma_core``: caching, retries, logging, artifacts; no ML logic.

Each stage is a task whose result is small (paths plus content hashes, see :mod:`tasks.results`),
whose cache key comes from content and code (:mod:`tasks.caching`), and whose outputs live in a
directory named by that key.
"""
