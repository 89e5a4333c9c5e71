"""The crop service: core (no web framework), typed refusals, HTTP layer, test helpers."""
