"""cpns: the open implementation of the OMA CPNS security enabler.

The package is a sans-I/O core (:mod:`cpns.messages`, :mod:`cpns.crypto`,
:mod:`cpns.protocol`) wrapped by thin I/O shells (:mod:`cpns.server`,
:mod:`cpns.gateway`, :mod:`cpns.device`, :mod:`cpns.store`, :mod:`cpns.cli`).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
