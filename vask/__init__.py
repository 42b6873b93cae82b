"""Vask: a Pusher Channels protocol server (WebSocket protocol 7, HTTP API, webhooks)."""

__version__ = "0.1.0"
