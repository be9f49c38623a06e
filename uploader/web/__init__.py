"""The HTTP API (api.py) and the status page: its routes, login and actions, the fleet, the static files."""
