"""Build the CPU kernels (``kernels.c``) with the system's C compiler and load them with :mod:`ctypes`.

One idea lives here: turning ``kernels.c`` into a loaded shared library, safely.

* **Compiler**: ``$CC`` split as a shell would split it (``CC="ccache gcc"`` runs ``ccache`` with
  ``gcc`` as its first argument), else ``cc``, ``gcc`` or ``clang`` from ``PATH``.
* **Flags**: :data:`FLAGS`; a compiler that refuses the 512-bit vector preference builds without
  it, and one that refuses OpenMP too builds a one-thread library (:func:`flag_sets`).  The next
  set is compiled only when the one before it failed.
* **Cache**: one library per source, flags, full compiler command and CPU (``-march=native``), in
  ``$LIT_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/lit_prune`` or ``~/.cache/lit_prune``
  (:func:`cache_dir`), created with mode ``0700``.  Use a directory of your own: a library found
  there runs inside the training process, so it is loaded only where nobody else can have written
  it.  The cache directory must be owned by the current user and not writable by group or others,
  and each directory above it owned by the user or root and not writable by group or others
  (unless sticky, as ``/tmp`` is); a cached library must be a regular file (not a symbolic link)
  owned by the user and not writable by group or others.  Where either is refused, a
  :class:`UnsafeCacheWarning` names the path and why, and the kernels are built in a fresh private
  temporary directory (mode ``0700``, removed once loaded), which every process then repeats.
* **Build**: compiled beside its target and renamed into place, so concurrent processes (DDP
  ranks) never load half a file.

Nothing is built at import: :func:`load` builds (or finds) the library when it is first asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "FLAGS",
    "PREFER_512",
    "SOURCE",
    "UnsafeCacheWarning",
    "build",
    "cache_dir",
    "checked_cache_dir",
    "compiler_command",
    "cpu_id",
    "directory_problem",
    "flag_sets",
    "library_name",
    "library_problem",
    "load",
    "native_enabled",
]

_log = logging.getLogger(__name__)

#: The C source of the kernels.
SOURCE = Path(__file__).with_name("kernels.c")

#: GCC vectorises for 256-bit registers on AVX-512 Intel CPUs unless told otherwise; 512-bit loops
#: made block pooling and expansion 11-13 % faster (ResNet-18, 4x4 AVG and MAX, side by side on a
#: 2-core AVX-512 machine) and left the element-wise update as it was.  x86 only: other compilers'
#: targets do not know the option.  A compiler that refuses it builds without it.
PREFER_512 = "-mprefer-vector-width=512"

#: The flags of the first build (see :func:`flag_sets` for the fallbacks).
FLAGS: tuple[str, ...] = (
    "-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-fopenmp",
    *((PREFER_512,) if platform.machine() in ("x86_64", "AMD64") else ()),
)  # fmt: skip

_TIMEOUT_S = 120
#: Permission bits that let someone other than the owner change a file or a directory's entries.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafeCacheWarning(UserWarning):
    """A cache directory or cached library that others could have written was refused (a private build follows)."""


def native_enabled() -> bool:
    """The ``LIT_PRUNE_NATIVE`` switch: ``'1'`` (default) or ``'0'``; anything else is a ``ValueError``.

    Checked when a :class:`~lit_prune.Pruning` is built, so a misspelt value fails before training.
    """
    switch = os.environ.get("LIT_PRUNE_NATIVE", "1")
    if switch not in ("0", "1"):
        raise ValueError(f"environment variable LIT_PRUNE_NATIVE must be '0' (off) or '1' (on), got {switch!r}")
    return switch == "1"


def cache_dir() -> Path:
    """Where libraries are cached: ``$LIT_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/lit_prune`` or ``~/.cache/lit_prune``.

    Example::

        >>> os.environ.get("LIT_PRUNE_CACHE") is not None or cache_dir().name == "lit_prune"
        True
    """
    if "LIT_PRUNE_CACHE" in os.environ:
        return Path(os.environ["LIT_PRUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lit_prune"


def compiler_command() -> list[str] | None:
    """The compiler's command words: ``$CC`` split as a shell would, else ``cc``, ``gcc`` or ``clang`` (``None``: none).

    Raises:
        ValueError: ``$CC`` cannot be split (an unclosed quote).

    Example::

        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"CC": "ccache gcc -m64"}):
        ...     compiler_command()
        ['ccache', 'gcc', '-m64']
    """
    words = shlex.split(os.environ.get("CC", ""))
    if words:
        return words
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def cpu_id() -> str:
    """The CPU's feature flags: with ``-march=native``, a library built on one CPU may not run on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(
            (line for line in text.splitlines() if line.startswith(("flags", "Features"))), platform.processor()
        )
    except OSError:
        return platform.processor()


def flag_sets() -> list[tuple[str, ...]]:
    """The flag sets to try in order: :data:`FLAGS`; without the 512-bit preference; without OpenMP too.

    Without OpenMP (the runtime torch has loaded) the library runs on one thread.
    """
    sets = [tuple(FLAGS)]
    for dropped in ({PREFER_512}, {PREFER_512, "-fopenmp"}):
        flags = tuple(f for f in FLAGS if f not in dropped)
        if flags not in sets:
            sets.append(flags)
    return sets


def library_name(command: Sequence[str], flags: Sequence[str]) -> str:
    """The cached library's file name: a hash of the source, the flags, the full compiler command and the CPU."""
    parts = [SOURCE.read_bytes(), "\0".join(flags).encode(), "\0".join(command).encode(), cpu_id().encode()]
    digest = hashlib.sha256(b"\1".join(parts)).hexdigest()
    return f"cpu_kernels-{digest[:16]}.so"


def _mode(st: os.stat_result) -> str:
    return oct(stat.S_IMODE(st.st_mode))


def _ownership_problem(st: os.stat_result) -> str | None:
    """Why a cache directory or cached library with this status is unsafe to trust; ``None``: it is safe."""
    uid = os.getuid()
    if st.st_uid != uid:
        return f"it is owned by uid {st.st_uid}, not by the current user (uid {uid})"
    if st.st_mode & _OTHERS_WRITE:
        return f"group or others can write to it (mode {_mode(st)})"
    return None


def directory_problem(path: Path) -> str | None:
    """Why libraries in directory ``path`` (which must exist) could have been written by someone else; ``None``: safe.

    ``path`` (symbolic links resolved) must be a directory owned by the current user that group and
    others cannot write to; each directory above it must be owned by the user or root and not
    writable by group or others, unless sticky (as ``/tmp``): nobody else can then rename it away.
    """
    real = Path(os.path.realpath(path))
    st = os.lstat(real)
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    problem = _ownership_problem(st)
    if problem is not None:
        return problem
    uid = os.getuid()
    for parent in real.parents:
        st = os.lstat(parent)
        if st.st_uid not in (0, uid):
            return f"the directory above it, {parent}, is owned by uid {st.st_uid} (not the current user or root)"
        if st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
            return f"group or others can write to the directory above it, {parent} (mode {_mode(st)}, not sticky)"
    return None


def library_problem(path: Path) -> str | None:
    """Why the library at ``path`` is unsafe to load; ``None``: safe.  Raises ``FileNotFoundError`` where there is none.

    It must be a regular file, not a symbolic link (opened with ``O_NOFOLLOW``), owned by the current
    user, and not writable by group or others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        if os.path.islink(path):
            return "it is a symbolic link"
        return f"it cannot be opened ({error})"
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    return _ownership_problem(st)


def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and any missing directory above it with mode ``0700`` (existing ones are left as they are)."""
    missing = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process (a DDP rank) made it first
            os.mkdir(p, 0o700)


def _refuse(path: Path, problem: str) -> None:
    warnings.warn(
        f"lit_prune: refusing {path}: {problem}; building the CPU kernels in a private temporary directory instead "
        "(set LIT_PRUNE_CACHE to a directory of your own, or fix its owner and permissions)",
        UnsafeCacheWarning,
        stacklevel=3,
    )


def checked_cache_dir() -> Path | None:
    """:func:`cache_dir`, created with mode ``0700`` where missing, if it is safe (:func:`directory_problem`).

    Otherwise a :class:`UnsafeCacheWarning` names it and why, and the result is ``None``.
    """
    path = cache_dir()
    try:
        _make_private_dirs(path)
        problem = directory_problem(path)
    except OSError as error:
        problem = f"it cannot be used ({error})"
    if problem is not None:
        _refuse(path, problem)
        return None
    return path


def build(command: Sequence[str], flags: Sequence[str], directory: Path) -> Path:
    """Compile the kernels with ``flags`` into ``directory`` (made with mode ``0700`` if missing) unless already there.

    ``command`` is the compiler's command words (:func:`compiler_command`).  The library is
    compiled in a private directory beside its target, made readable by everyone and writable by
    its owner only, and renamed into place.  Returns its path; an existing library is returned as
    it is (:func:`load` checks it with :func:`library_problem` first).

    Raises:
        OSError, subprocess.SubprocessError: the compiler is missing or failed (its stderr on the
            ``CalledProcessError``).
    """
    target = directory / library_name(command, flags)
    if not target.exists():
        _make_private_dirs(directory)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            built = Path(tmp) / target.name
            subprocess.run(
                [*command, *flags, "-o", str(built), str(SOURCE)], check=True, capture_output=True, timeout=_TIMEOUT_S
            )
            os.chmod(built, 0o755)  # whatever the umask: nobody but its owner may change what gets loaded
            os.replace(built, target)
    return target


def _load_flags(command: list[str], flags: tuple[str, ...], cache: Path | None) -> ctypes.CDLL:
    """The library built with ``flags``: from ``cache`` where safe, else built and loaded from a private directory."""
    if cache is not None:
        target = cache / library_name(command, flags)
        try:
            problem = library_problem(target)
        except FileNotFoundError:
            build(command, flags, cache)
            problem = library_problem(target)  # what the build left there, checked as any other
        if problem is None:
            return ctypes.CDLL(str(target))
        _refuse(target, problem)
    private = Path(tempfile.mkdtemp(prefix="lit_prune-"))  # mode 0700, made by this process
    try:
        problem = directory_problem(private)
        if problem is not None:
            raise PermissionError(f"the private build directory {private} is unsafe: {problem}")
        return ctypes.CDLL(str(build(command, flags, private)))  # still mapped once the file is gone
    finally:
        shutil.rmtree(private, ignore_errors=True)


def load() -> ctypes.CDLL | None:
    """The kernels' library, built or found in the cache and loaded; ``None`` (with a warning) where it cannot be.

    ``None`` with ``LIT_PRUNE_NATIVE=0``, without a C compiler, off Linux, or where every flag set
    of :func:`flag_sets` failed to build or load (the warning holds each error).  The caller
    declares the functions' signatures (:mod:`lit_prune.backends.cpu.kernels`) and caches the result.

    Raises:
        ValueError: ``LIT_PRUNE_NATIVE`` is neither ``'0'`` nor ``'1'``.
    """
    if not native_enabled():
        return None
    try:
        command = compiler_command()
    except ValueError as error:
        _log.warning("lit_prune: $CC cannot be split (%s); CPU mask updates use the eager PyTorch path", error)
        return None
    if command is None or platform.system() != "Linux":
        _log.warning("lit_prune: no C compiler (or not Linux); CPU mask updates use the eager PyTorch path")
        return None
    cache = checked_cache_dir()
    errors = []
    for flags in flag_sets():
        try:
            return _load_flags(command, flags, cache)
        except (OSError, subprocess.SubprocessError) as error:
            detail = (getattr(error, "stderr", b"") or b"")[-500:]
            errors.append(f"{error} {detail.decode(errors='replace')}".strip())
    _log.warning("lit_prune: building the CPU kernels failed (%s); using the eager path", " | ".join(errors))
    return None
