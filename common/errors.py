"""The project's exception tree.

Every error a user can cause derives from :class:`FedsynthError`, so the CLI can print
its message and exit non-zero without a traceback. Messages name the file or field,
the value and what was expected.
"""

from __future__ import annotations


class FedsynthError(Exception):
    """Base class for errors a user can act on.

    Args:
        message: the full message for the person at this machine (may name local paths).
        public: what may be told to the other side of the federation; a site never sends
            paths, file names or patient ids to the server. Defaults to the class name.
    """

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or type(self).__name__


class ConfigError(FedsynthError):
    """A configuration file or value is invalid."""


class SiteDataError(FedsynthError):
    """A site's data folder holds nothing usable, or a file cannot be read."""


class PrivacyBudgetError(FedsynthError):
    """Training would exceed the site's own privacy budget."""


class PolicyError(FedsynthError):
    """A task would loosen the site's own policy, or comes from an app the site has not approved."""


class CheckpointError(FedsynthError):
    """A checkpoint is missing, unreadable or does not match the model."""


class FederationError(FedsynthError):
    """A federation run failed or could not be started."""
