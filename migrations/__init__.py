"""Alembic scripts for lagompy's own tables, shipped inside the package as ``lagompy.migrations``.

Nothing here is meant to be imported: :mod:`lagompy.migrate` points Alembic at this directory
(``env.py``, ``script.py.mako`` and ``versions/``). See ``README.md`` beside this file.
"""
