"""Imports every built-in criterion module so that they register themselves."""
from . import activation, blend, discrimination, variety, weight  # noqa: F401
