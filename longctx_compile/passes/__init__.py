"""Graph passes every form shares; importing this registers them (each form registers its own, ``forms/``)."""

from . import canonicalize, lower  # noqa: F401
