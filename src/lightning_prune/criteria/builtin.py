"""Imports every built-in criterion module so that they register themselves."""
from . import activation, blend, discrimination, normalized, variety, weight  # noqa: F401
