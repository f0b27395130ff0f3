"""Runs Reef's services as local processes, for ``make demo`` and ``make dev``."""
