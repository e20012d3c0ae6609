"""Lineage agent: spool -> derive -> crypto -> sink -> ingest -> api."""
