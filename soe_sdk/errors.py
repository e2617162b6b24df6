"""The one exception type the SDK raises for bad input.

Every message is a single line that names the file (or argument) and the problem, so the
CLI can print it as is and exit non-zero.
"""
from __future__ import annotations


class SoeError(Exception):
    """A user-facing error: bad archive, bad documents, bad option. One line, no traceback."""


class ArchiveError(SoeError):
    """A `.soe` file is missing, truncated, corrupted, of another version, or not an archive."""


class DocumentsError(SoeError):
    """The documents given for specialisation hold no usable text, or cannot be reached."""


class ExportError(SoeError):
    """An export failed (unwritable folder, failed parity validation, ...)."""
