"""User-facing errors: the entry point prints these as one short message, no traceback."""

from __future__ import annotations

from enum import Enum
from typing import Any


class AmrcError(Exception):
    """Base class for errors a user can fix by changing the config or the environment."""


class ConfigError(AmrcError, ValueError):
    """A config value is invalid. Names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        shown = value.value if isinstance(value, Enum) else value  # a choice prints as typed
        super().__init__(f"invalid config value {key}={shown!r}: expected {allowed}")


class UnknownKeyError(AmrcError):
    """A config key that is not in the schema (a typo, or a `+key` the run would ignore)."""

    def __init__(self, key: str, value: Any, closest: str | None) -> None:
        self.key, self.value, self.closest = key, value, closest
        hint = f"did you mean {closest}?" if closest else "no such key (`amrc --cfg job` lists them)"
        super().__init__(f"unknown config key {key}={value!r}: {hint}")


class DataError(AmrcError):
    """Data is missing or malformed. The message names the override to set."""


class WeightsError(AmrcError):
    """Weights are missing, corrupt or do not match the architecture."""


class DiskSpaceError(AmrcError):
    """The output directory's file system lacks the space a run needs to write its results."""
