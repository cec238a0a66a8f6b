"""Errors a user can cause and fix. The CLI prints each as one line (`vaepipe: error: ...`) and exits with status 2,
without a traceback (`VAEPIPE_DEBUG=1` shows it); every message names the cause and the fix.

    UserError                      the base: catch this to catch everything a user can fix
    ├── ConfigError                a config value, a flag, or a combination of them (also a vae.config.ConfigError)
    ├── MissingInputError          a file, run, model or checkpoint that is not there (also a FileNotFoundError)
    ├── DatasetError               a dataset that is missing, corrupt or mis-shaped (pipelines.data)
    ├── TrackingUnavailableError   a tracking store that cannot be reached or used
    ├── ModelIntegrityError        a logged model whose files changed since it was logged
    ├── TrainingError              training cannot go on (diverged, workers kept dying)
    └── SearchError                a search left nothing usable

The model package keeps its own `vae.config.ConfigError` (it imports nothing from here); `USER_ERRORS` is the tuple
the CLI catches.
"""
from __future__ import annotations

from vae.config import ConfigError as ModelConfigError


class UserError(Exception):
    """An error whose message tells the user what to change."""


class ConfigError(UserError, ModelConfigError):
    """A config value, a command-line flag, or a combination of them is wrong."""


class MissingInputError(UserError, FileNotFoundError):
    """Something the command needs is not there: a file, a run, a registered model, a checkpoint."""


class DatasetError(UserError, ValueError):
    """A prepared dataset is missing, incomplete, changed or does not match its manifest or the config; the message
    says how to fix it (usually the `vaepipe data prepare` command to run)."""


class TrackingUnavailableError(UserError, RuntimeError):
    """The tracking store cannot be reached or used; the message names the URI (credentials masked) and the fix."""

    def __init__(self, message: str) -> None:
        from pipelines.redaction import redact_text

        super().__init__(redact_text(message))


class ModelIntegrityError(UserError, RuntimeError):
    """A logged model's files differ from the sha256 recorded when it was logged, or none was recorded: vaepipe
    refuses to unpickle it."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. it diverged, or Ray lost its workers too often); the message names likely fixes.

    `reason` is recorded on the run (`vaepipe.end_reason`): a run that "diverged" is not resumed unless named."""

    reason = "failed"


class Diverged(TrainingError):
    """The model diverged: the loss, the gradients or the validation figures stopped being finite."""

    reason = "diverged"


class SearchError(UserError, RuntimeError):
    """The search produced nothing usable (every trial failed, or no checkpoint); the message lists the errors."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ModelConfigError)
