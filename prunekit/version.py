"""prunekit's version: below everything, so a module that records it imports nothing else of prunekit."""

__version__ = "0.1.0"
