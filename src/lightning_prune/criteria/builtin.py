"""Imports every built-in criterion module so that they register themselves."""
from . import weight  # noqa: F401
