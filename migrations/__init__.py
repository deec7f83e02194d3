"""The alembic scripts, installed as the package ``stock_sync_migrations`` (pyproject.toml maps
it onto this folder) so that stock_sync/adapters/schema.py finds them in a wheel as in a
checkout."""
