"""Alembic scripts for lagompy's own tables, shipped as ``lagompy.sql.migrations``.

Nothing here is meant to be imported: :mod:`lagompy.sql` points Alembic at this directory
(``env.py``, ``script.py.mako`` and ``versions/``). See ``README.md`` beside this file.
"""
