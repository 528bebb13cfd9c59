"""The OpenAI-compatible HTTP layer: wire types (``protocol``), logic (``serving``), routes (``app``)."""
