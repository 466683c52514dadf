"""Capture: getting committed row changes of the legacy table into the outbox.

``triggers.py`` (AFTER ROW trigger, transactional outbox) and ``logical.py`` (pgoutput slot) write
the same outbox row format (docs/architecture.md); ``snapshot.py`` writes the initial-sync rows.
"""
