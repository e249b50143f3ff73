"""Audio moderation pipeline: transfer -> unpack -> transcribe + classify.

Workers are plain loops over Redis lists (see ``queue``); results land in
PostgreSQL (see ``db`` and the top-level ``schema.sql``).
"""

__version__ = "0.1.0"
