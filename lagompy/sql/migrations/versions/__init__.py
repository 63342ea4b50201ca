"""Revisions of lagompy's tables, applied in order by :mod:`lagompy.sql`."""
