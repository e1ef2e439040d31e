"""Tools run from a checkout (never shipped in the package): ``python -m tools.generate``."""
