"""Change-data-capture from a legacy PostgreSQL table into Zoho CRM."""

from __future__ import annotations

__version__ = "0.1.0"
