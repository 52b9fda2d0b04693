"""The in-process driver: participants given as plain Python callables (``LocalDriver``)."""
