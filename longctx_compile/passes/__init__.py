"""Graph passes; importing this registers them all with the pipeline."""

from . import canonicalize, lower, ulysses  # noqa: F401
