"""The webhook sender: its own process, fed by the broker (docs/webhooks.md)."""
