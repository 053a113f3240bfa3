"""How tasks reach storage: the storage options every config carries, checked for credentials
(the Prefect UI shows parameters, so secrets come from the environment or a Secret block,
see :mod:`tasks.credentials`), and the check of a dataset destination before anything is written."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, model_validator

from storage.errors import ConfigError, DestinationError, SwarmError
from storage.reach import missing_bucket, reaching
from storage.urls import CREDENTIALS_OPTION, url_to_fs

SECRET_WORDS = ("secret", "password", "token", "key_id", "access_key", "credential", "session")
_URL_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", re.IGNORECASE)


def check_storage_options(options: dict[str, Any]) -> dict[str, Any]:
    """Refuse credentials in parameters the Prefect UI would show; point to the right place."""
    for key in options:
        if key == CREDENTIALS_OPTION:
            continue  # names a block; the secret itself stays in the block
        if any(word in key.lower() for word in SECRET_WORDS) or key.lower() in ("key", "secret"):
            raise ConfigError(
                f"storage option {key!r} looks like a credential; parameters are shown in the Prefect UI, "
                "so pass credentials through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) "
                f"or a Prefect Secret block named by the storage option {CREDENTIALS_OPTION!r}"
            )
    return options


# A flow parameter of fsspec options, checked for credentials wherever it is declared.
StorageOptions = Annotated[dict[str, Any], AfterValidator(check_storage_options)]


class StorageAccess(BaseModel):
    """Where the work runs and how storage is reached (never credentials: the UI shows these)."""

    storage_options: StorageOptions = Field(
        default_factory=dict, description="fsspec storage options (endpoint_url, …); never credentials"
    )
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler (default: a local cluster)")

    @model_validator(mode="after")
    def _no_credentials_in_urls(self) -> "StorageAccess":
        for name, value in self:
            if isinstance(value, str) and any(_URL_CREDENTIALS.match(part) for part in value.split("::")):
                raise ValueError(
                    f"{name} carries credentials in its URL (user:password@…); parameters are shown in the Prefect "
                    "UI, so pass credentials through the environment or a Prefect Secret block named by the storage "
                    f"option {CREDENTIALS_OPTION!r}"
                )
        return self


def check_destination(dest: str, storage_options: dict[str, Any], role: str = "destination"):
    """``(fs, root)`` of a dataset's destination: a folder or a new path, in a bucket that
    exists. ``role`` is what errors call it (the CLI argument's name)."""
    fs, root = url_to_fs(dest, storage_options)
    root = root.rstrip("/")
    with reaching(dest):  # an endpoint that does not answer: one line naming the URL
        return _check_destination(fs, root, dest, role)


def _check_destination(fs, root: str, dest: str, role: str):
    try:
        if fs.isfile(root):
            raise DestinationError(f"{role} {dest!r} is an existing file; give a folder (or a new path) for the dataset")
        missing = missing_bucket(fs, root, dest, role)
        if missing:
            raise DestinationError(missing)
    except SwarmError:
        raise
    except (PermissionError, OSError) as exc:
        raise DestinationError(f"cannot reach {role} {dest!r}: {exc}") from None
    return fs, root
