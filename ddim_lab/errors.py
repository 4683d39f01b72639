"""The lab's own error types, at the bottom of the layers so that every package may raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message is one line that names the key."""
