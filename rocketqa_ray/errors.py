"""User-facing errors: each says what is wrong and what to do about it.

Jobs catch `RocketQAError` and print its message as one line (exit code 2); anything else is a bug
and keeps its traceback.
"""


class RocketQAError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class ConfigError(RocketQAError):
    """Unknown config key, wrong value type, or an invalid combination of settings."""


class DataError(RocketQAError):
    """Malformed or inconsistent input data (names the file and, where it applies, the line)."""


class StageConfigChanged(RocketQAError):
    """A completed pipeline stage is being resumed with a different config."""


def user_error(e: BaseException) -> RocketQAError | None:
    """The RocketQAError behind an exception from a Ray worker (Train worker or Ray Data actor), or None.

    Ray wraps a worker's exception: sometimes as the `__cause__` chain (Ray Data), sometimes only as the
    worker's traceback text (Ray Train's WorkerGroupError). Both lead to the one-line message the user needs.
    """
    import re

    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, RocketQAError):
            # ray.get of a failed task raises a RayTaskError that also subclasses the error; its text is the
            # worker's traceback, its `cause` the error itself
            cause = getattr(cur, "cause", None)
            return cause if isinstance(cause, RocketQAError) else cur
        cur = cur.__cause__ or cur.__context__
    m = re.search(r"rocketqa_ray\.errors\.(\w+): (.+)", str(e))
    cls = globals().get(m.group(1)) if m else None
    if isinstance(cls, type) and issubclass(cls, RocketQAError):
        return cls(m.group(2).strip())
    return None


class ResourceError(RocketQAError):
    """The machine ran out of something the job needs (memory): what happened, and which knobs need less."""


def resource_error(e: BaseException, what: str) -> ResourceError | None:
    """A one-line ResourceError for Ray's out-of-memory kill of `what`'s workers (its message names the node's
    memory), or None for any other failure."""
    import re

    text = str(e)
    if "low on memory" not in text and "OutOfMemoryError" not in text:
        return None
    m = re.search(r"was ([\d.]+GB used / [\d.]+GB limit)", text)
    used = f" ({m.group(1)})" if m else ""
    return ResourceError(f"{what}: Ray killed its workers because the node ran low on memory{used}. Rerun the same "
                         "command to resume; with less memory per worker (dual.batch_size, dual.grad_cache=true, "
                         "model.passage_max_len, ray.num_workers) or nothing else running on the node")


class ServiceError(RocketQAError):
    """The RUN_DIR cannot be served (missing model/index, mismatched files, bad service arguments)."""


def as_user_error(e: Exception) -> Exception:
    """What to raise for an exception from Ray: a fresh copy of the user error behind it (its one-line message,
    without the worker's traceback), or the exception itself."""
    user = user_error(e)
    return e if user is None else type(user)(str(user))
