"""Our one-line errors, raised inside Ray tasks and actors, surfaced as themselves.

Ray wraps an exception raised remotely (``RayTaskError``, Ray Data's
``UserCodeException``) in a message carrying the remote traceback. The user should
see the :class:`~forge_ray.errors.ForgeRayError` underneath (file + problem, one line),
exactly as if the stage had run in one process.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from forge_ray.errors import ForgeRayError


def user_error(exc: BaseException) -> ForgeRayError | None:
    """The ForgeRayError a Ray task raised, unwrapped from Ray's exception wrappers."""
    from ray.exceptions import RayError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ForgeRayError) and not isinstance(exc, RayError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


@contextlib.contextmanager
def surface_user_errors() -> Iterator[None]:
    """Re-raise a remote ForgeRayError as itself; anything else propagates unchanged.

    Ray Data jobs executed inside keep a UDF's own exception: by default Ray Data
    replaces it by a ``UserCodeException`` that holds only its traceback text.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous, ctx.raise_original_map_exception = ctx.raise_original_map_exception, True
    try:
        yield
    except Exception as e:
        err = user_error(e)
        if err is not None:
            raise err from None
        raise
    finally:
        ctx.raise_original_map_exception = previous
