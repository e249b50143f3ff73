"""Database writes, one module per owning stage (upserts on natural keys)."""
