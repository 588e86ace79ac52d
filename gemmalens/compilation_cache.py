"""A persistent compilation cache, on by default, so a restarted kernel does not compile again.

JAX can store the programs it compiles on disk and load them in a later process instead of
compiling them again. ``import gemmalens`` turns that on, under the user's cache directory
(``$XDG_CACHE_HOME/gemmalens/jax``, else ``~/.cache/gemmalens/jax``; ``~/Library/Caches``
on macOS, ``%LOCALAPPDATA%`` on Windows)::

    import gemmalens as gl
    gl.compilation_cache.info()                      # where it is, whether it is on, its size
    gl.compilation_cache.configure("/scratch/jax")   # somewhere else
    gl.compilation_cache.configure(False)            # off

The environment variable ``GEMMALENS_COMPILATION_CACHE`` chooses at import: a directory,
or ``0`` / ``off`` / ``false`` / an empty value for off. A directory that a user gave JAX
themselves (``jax_compilation_cache_dir``, or ``JAX_COMPILATION_CACHE_DIR``) is kept, and
so is a compile-time threshold they set. The cache is trusted code: do not point it at a
directory that others can write to.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import warnings
from pathlib import Path

import jax

#: The environment variable read at import, a directory or ``0`` / ``off`` / empty for off.
ENV_VAR = "GEMMALENS_COMPILATION_CACHE"

# Programs that compile faster than this are not written: tiny CPU programs (dtype
# conversions, ~10-30 ms each) would fill the directory and cost as much to load as to
# compile. Teaching models' forwards compile in 0.45-0.65 s on the 2-core CI machine (so a
# 0.5 s threshold kept them only in some runs), a real model's in tens of seconds; JAX's
# own default (1 s) misses the former.
#: Seconds of compilation below which a program is not written (unless the user set JAX's).
DEFAULT_MIN_COMPILE_TIME_SECS = 0.2

_OFF_VALUES = {"", "0", "off", "false", "no", "none"}
_DEFAULT_VALUES = {"1", "on", "true", "yes", "default"}
# JAX's file names for entries (`jax._src.lru_cache`): "<module>-<hash>-cache".
_ENTRY_SUFFIX = "-cache"


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """The state of the persistent compilation cache (`info()` returns one).

    Attributes:
      enabled: whether newly compiled programs are written to and read from disk.
      path: the cache directory (None when off).
      managed_by: ``"gemmalens"``, ``"user"`` (a ``jax_compilation_cache_dir`` set outside
        gemmalens, which gemmalens leaves alone) or None when off.
      size_bytes: the bytes under ``path`` (None when off or not a local directory).
      entries: the number of compiled programs stored (None likewise).
      min_compile_time_secs: programs compiling faster than this are not written.
      note: a sentence saying why it is in this state.
    """

    enabled: bool
    path: str | None
    managed_by: str | None
    size_bytes: int | None
    entries: int | None
    min_compile_time_secs: float
    note: str


# The directory gemmalens gave JAX (None when gemmalens has not set one) and why the cache
# is in its state: `info()` tells a directory set by gemmalens from one set by the user.
_ours: str | None = None
_note: str = "not set up yet"


def default_path() -> Path:
    """The platform's user cache directory joined with ``gemmalens/jax``.

    Linux and others: ``$XDG_CACHE_HOME`` (when absolute), else ``~/.cache``; macOS:
    ``~/Library/Caches``; Windows: ``%LOCALAPPDATA%``. ``GEMMALENS_COMPILATION_CACHE`` is
    not read here.
    """
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # The XDG spec says a relative value is invalid and must be ignored.
        base = Path(xdg) if os.path.isabs(xdg) else home / ".cache"
    return base / "gemmalens" / "jax"


def _path_from_environment() -> Path | None | bool:
    """What ``GEMMALENS_COMPILATION_CACHE`` asks for: a directory, False (off) or None
    (unset or a "yes": the default directory)."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    if value.strip().lower() in _OFF_VALUES:
        return False
    if value.strip().lower() in _DEFAULT_VALUES:
        return None
    return Path(value).expanduser().absolute()


def _make_writable_dir(path: Path) -> None:
    """Creates ``path`` and checks that a file can be written in it (raises OSError)."""
    path.mkdir(parents=True, exist_ok=True)
    # Writing is the sure test: os.access reads permission bits, which root passes anyway.
    with tempfile.TemporaryFile(dir=path):
        pass


def _user_set_min_compile_time() -> bool:
    # JAX reads JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS into its config; a value other than
    # JAX's default means someone chose it.
    return (
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" in os.environ
        or jax.config.jax_persistent_cache_min_compile_time_secs != 1.0
    )


def _set_jax_dir(path: str | None) -> None:
    from jax.experimental.compilation_cache import compilation_cache as jax_cc

    jax.config.update("jax_compilation_cache_dir", path)
    # JAX opens its cache once per process, on the first compile after a directory is set;
    # without a reset it would keep writing to the old directory (or keep writing after off).
    jax_cc.reset_cache()


def setup_from_environment() -> None:
    """Turns the cache on at import, as ``GEMMALENS_COMPILATION_CACHE`` says.

    Leaves a ``jax_compilation_cache_dir`` that is already set alone. Never raises: a
    directory that cannot be created or written warns once and leaves the cache off.
    """
    global _ours, _note
    if jax.config.jax_compilation_cache_dir is not None:
        _note = (
            "jax_compilation_cache_dir was set before gemmalens was imported; "
            "gemmalens leaves it alone."
        )
        return
    wanted = _path_from_environment()
    if wanted is False:
        _note = f"turned off by {ENV_VAR}={os.environ.get(ENV_VAR)!r}."
        return
    path = wanted if isinstance(wanted, Path) else default_path()
    try:
        _make_writable_dir(path)
    except OSError as error:
        _note = f"off: {path} cannot be written ({error})."
        warnings.warn(
            f"gemmalens: the compilation cache stays off because {path} cannot be written "
            f"({error}). Set {ENV_VAR} to a writable directory, or to 'off' to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    if not _user_set_min_compile_time():
        jax.config.update(
            "jax_persistent_cache_min_compile_time_secs", DEFAULT_MIN_COMPILE_TIME_SECS
        )
    _set_jax_dir(str(path))
    _ours = str(path)
    _note = (
        f"set by {ENV_VAR}." if isinstance(wanted, Path) else "the default location (gemmalens)."
    )


def configure(
    path: str | os.PathLike | bool | None = None,
    min_compile_time_secs: float | None = None,
) -> CacheInfo:
    """Moves the compilation cache, turns it off or back on, or changes its threshold.

    Args:
      path: a directory (created if missing); False to turn the cache off; None keeps
        the current directory, or turns the cache on at the default location (the
        directory ``GEMMALENS_COMPILATION_CACHE`` names, else `default_path()`) when it
        is off. True is the default location.
      min_compile_time_secs: programs that compile faster than this are not written
        (None leaves the threshold as it is).

    Programs already compiled in this process stay in memory; the change applies to those
    compiled from now on. Raises OSError (and changes nothing) when the directory cannot
    be created or written. Returns `info()`.
    """
    global _ours, _note
    if path is False:
        _set_jax_dir(None)
        _ours = None
        _note = "turned off by configure(False)."
    else:
        current = jax.config.jax_compilation_cache_dir
        if path is None and current is not None:
            target = None  # keep it where it is
        elif path is None or path is True:
            wanted = _path_from_environment()
            target = wanted if isinstance(wanted, Path) else default_path()
        else:
            target = Path(path).expanduser().absolute()
        if target is not None:
            _make_writable_dir(target)
            if min_compile_time_secs is None and not _user_set_min_compile_time():
                min_compile_time_secs = DEFAULT_MIN_COMPILE_TIME_SECS
            if str(target) != current:
                _set_jax_dir(str(target))
            _ours = str(target)
            _note = "set by configure()."
    if min_compile_time_secs is not None:
        jax.config.update(
            "jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs)
        )
    return info()


def _disk_usage(path: str) -> tuple[int, int] | None:
    """(bytes, entries) under a local cache directory; None for a remote one (gs://...)."""
    if "://" in path and not path.startswith("file://"):
        return None
    root = Path(path.removeprefix("file://"))
    size = entries = 0
    if not root.is_dir():
        return 0, 0
    # On GPUs JAX also keeps XLA's autotuning results in a subdirectory: count them in size.
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                size += os.stat(os.path.join(directory, name)).st_size
            except OSError:  # removed while we walk (another process evicting)
                continue
            if directory == str(root) and name.endswith(_ENTRY_SUFFIX):
                entries += 1
    return size, entries


def info() -> CacheInfo:
    """Where the compilation cache is, whether it is on and how much disk it uses."""
    path = jax.config.jax_compilation_cache_dir
    threshold = float(jax.config.jax_persistent_cache_min_compile_time_secs)
    if not jax.config.jax_enable_compilation_cache:
        note = "off: jax_enable_compilation_cache is False."
        usage = _disk_usage(path) if path else None
        size, entries = usage or (None, None)
        return CacheInfo(False, path, None, size, entries, threshold, note)
    if path is None:
        return CacheInfo(False, None, None, None, None, threshold, _note)
    managed_by = "gemmalens" if path == _ours else "user"
    note = (
        _note
        if managed_by == "gemmalens"
        else "jax_compilation_cache_dir was set outside gemmalens; gemmalens leaves it alone."
    )
    size, entries = _disk_usage(path) or (None, None)
    return CacheInfo(True, path, managed_by, size, entries, threshold, note)
