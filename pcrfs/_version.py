"""The package version, in a module of its own so that the store writer and the index
loader can stamp it without importing the package root (and through it the public API)."""
__version__ = "0.1.0"
