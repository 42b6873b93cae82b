"""`vask bench`: load generator and scenarios for any Pusher-protocol server."""
