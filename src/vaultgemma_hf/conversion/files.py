"""Reading the small JSON side files of checkpoints and adapters with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import ConversionError


def read_json_object(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
    """Reads a JSON file that must hold an object.

    Args:
        path: The file.
        what: How the user gave the file (e.g. `"--config"`), put before the path in messages.

    Returns:
        The parsed object.

    Raises:
        ConversionError: the file cannot be read, is not JSON, or holds something else than an object.
    """
    where = f"{what} {path}" if what else str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{where}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise ConversionError(f"{where}: not a UTF-8 text file ({err})") from err
    except OSError as err:
        raise ConversionError(f"{where}: cannot be read ({err.strerror or err})") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data
