"""When an engine call's error means its actor is lost (and its requests go to the others)."""
from __future__ import annotations

import ray


def lost(e: Exception) -> str | None:
    """Why an actor whose call raised `e` is lost (None: it is not; the error is the request's)."""
    if isinstance(e, ray.exceptions.RayActorError):
        return f"it died ({first_line(e)})"
    if any(c.__name__ == "EngineDeadError" for c in type(e).__mro__ + type(getattr(e, "cause", None)).__mro__):
        return "its vLLM engine died (EngineDeadError); the actor was killed"
    return None


def first_line(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
