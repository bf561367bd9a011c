"""The SQLite index: schema and write statements (schema), reads (reader), and each
worker's record cache with the shared change count (cache)."""
