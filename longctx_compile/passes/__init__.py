"""Graph passes; importing this registers them all with the pipeline."""

from . import canonicalize, lower, sequence_parallel  # noqa: F401
