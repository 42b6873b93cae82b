"""The dashboard's page and assets (served by :mod:`vask.broker.admin`; no build step)."""
