"""Errors raised by the Python layer, with the same codes as the library's."""

from __future__ import annotations

from typing import Optional

from ._tpde import TpdeError


def tpde_error(code: str, message: str, *, tensor: Optional[str] = None) -> TpdeError:
    """A ``TpdeError`` built in Python, shaped like those the library raises."""
    error = TpdeError(f"{code}: {message}" + (f' (tensor "{tensor}")' if tensor is not None else ""))
    error.code = code
    error.file = None
    error.tensor = tensor
    error.chunk = None
    return error
