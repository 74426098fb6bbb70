"""Graph passes; importing this registers them all with the pipeline."""

from . import canonicalize, doc_rope, eviction, hsa, lower, msa, sequence_parallel  # noqa: F401
