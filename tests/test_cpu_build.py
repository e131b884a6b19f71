"""Building and loading the CPU kernels: compilers, flag fallbacks, the cache and what it trusts.

Most tests build with quick flags (``-O0``, about 0.2 s instead of about 2 s); one builds with the
real ones.  Private builds go to a temporary directory of the test's own, so that each test sees
what was built there and that it was removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lit_prune import Pruning, PruningCallback, PruningHParams
from lit_prune.backends.cpu import build
from lit_prune.backends.cpu import kernels as cpu_kernels

SYSTEM_CC = shutil.which("cc") or shutil.which("gcc")
needs_compiler = pytest.mark.skipif(
    sys.platform != "linux" or SYSTEM_CC is None, reason="no C compiler: the eager path is the product here"
)
QUICK = ("-O0", "-march=native", "-fPIC", "-shared", "-fopenmp", *(f for f in build.FLAGS if f == build.PREFER_512))


@pytest.fixture
def fresh(monkeypatch, tmp_path: Path) -> Path:
    """An empty cache directory (not made yet), quick flags, private builds under ``tmp_path / "tmp"``."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIT_PRUNE_CACHE", str(cache))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("LIT_PRUNE_NATIVE", raising=False)
    monkeypatch.setattr(build, "FLAGS", QUICK)
    private = tmp_path / "tmp"
    private.mkdir(mode=0o700)
    monkeypatch.setattr("tempfile.tempdir", str(private))
    cpu_kernels._library.cache_clear()
    yield cache
    cpu_kernels._library.cache_clear()  # the next test loads the library of the real flags again


def kernels_work() -> bool:
    """The loaded kernels zero what a mask prunes and find TF's histogram threshold."""
    if not cpu_kernels.available():
        return False
    w, mask = torch.tensor([-1.0, 2.0, -3.0, 4.0]), torch.tensor([True, False, True, False])
    cpu_kernels.MaskBatch([w], [mask]).apply()
    assert w.tolist() == [-1.0, 0.0, -3.0, 0.0]
    w, mask, threshold = torch.linspace(-1, 1, 1 << 17), torch.ones(1 << 17, dtype=torch.bool), torch.zeros(())
    found = cpu_kernels.magnitude_update([w], [mask], [1 << 16], [threshold], exact=False, nbins=256, decay=None)
    assert found.thresholds == [127 / 256] and found.kept == [int((w != 0).sum())]
    return True


def loaded_from() -> Path:
    """Where the loaded library was loaded from."""
    return Path(cpu_kernels._library()._name)


def build_cache(cache: Path) -> Path:
    """Build the quick library into ``cache`` the usual way; returns its path (the library is then forgotten)."""
    assert kernels_work()
    (library,) = cache.iterdir()
    cpu_kernels._library.cache_clear()
    return library


def refused(cache_or_library: Path, why: str):
    return pytest.warns(
        build.UnsafeCacheWarning, match=f"refusing {re.escape(str(cache_or_library))}: .*{re.escape(why)}"
    )


def owned_by_another_user(real_stat, is_target):
    """``real_stat`` (``os.lstat``, ``os.fstat``) that reports ``is_target``'s file as owned by another uid."""
    uid = os.getuid()

    def fake(target, *args, **kwargs):
        st = real_stat(target, *args, **kwargs)
        if is_target(target):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, uid + 1, *tuple(st)[5:]))
        return st

    return fake


def assert_private_build(tmp_path: Path) -> None:
    """The kernels came from a private directory under ``tmp_path / "tmp"``, which is gone now."""
    assert loaded_from().parent.parent == tmp_path / "tmp"
    assert loaded_from().parent.name.startswith("lit_prune-")
    assert not any((tmp_path / "tmp").iterdir())


@needs_compiler
def test_a_safe_cache_is_made_private_and_used_without_a_rebuild(fresh, monkeypatch, tmp_path):
    cache = tmp_path / "deeper" / "cache"
    monkeypatch.setenv("LIT_PRUNE_CACHE", str(cache))
    with warnings.catch_warnings():
        warnings.simplefilter("error", build.UnsafeCacheWarning)
        library = build_cache(cache)
        for made in (cache, cache.parent):
            assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
        assert not library.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        before = library.stat()
        monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: pytest.fail(f"rebuilt: {a}"))
        assert kernels_work()
    assert loaded_from() == library
    assert list(cache.iterdir()) == [library] and library.stat().st_mtime_ns == before.st_mtime_ns


@needs_compiler
@pytest.mark.parametrize("mode", [0o770, 0o757], ids=["group-writable", "world-writable"])
def test_a_cache_directory_others_can_write_is_refused(fresh, tmp_path, mode):
    fresh.mkdir()
    fresh.chmod(mode)
    with refused(fresh, "group or others can write to it"):
        assert kernels_work()
    assert_private_build(tmp_path)
    assert not any(fresh.iterdir())  # nothing written where others could have replaced it


@needs_compiler
def test_a_cache_directory_of_another_user_is_refused(fresh, monkeypatch, tmp_path):
    fresh.mkdir(mode=0o700)
    real_path = str(fresh.resolve())
    monkeypatch.setattr(build.os, "lstat", owned_by_another_user(os.lstat, lambda path: str(path) == real_path))
    with refused(fresh, f"owned by uid {os.getuid() + 1}, not by the current user"):
        assert kernels_work()
    assert_private_build(tmp_path)


@needs_compiler
def test_a_cache_under_a_directory_others_can_write_is_refused(fresh, monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone could rename the cache away and put their own in its place
    cache = shared / "cache"
    monkeypatch.setenv("LIT_PRUNE_CACHE", str(cache))
    with refused(cache, f"the directory above it, {shared}"):
        assert kernels_work()
    assert_private_build(tmp_path)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: only the owner can rename what is in it
    monkeypatch.setenv("LIT_PRUNE_CACHE", str(sticky / "cache"))
    cpu_kernels._library.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", build.UnsafeCacheWarning)
        assert kernels_work()
    assert loaded_from().parent == sticky / "cache"


@needs_compiler
@pytest.mark.parametrize("mode", [0o775, 0o757], ids=["group-writable", "world-writable"])
def test_a_cached_library_others_can_write_is_refused(fresh, tmp_path, mode):
    library = build_cache(fresh)
    # A new file in its place: writing into the loaded one would truncate pages this process has
    # mapped (a SIGBUS later, at the latest when the interpreter exits).
    library.unlink()
    library.write_bytes(b"not a library: loading it would fail")
    library.chmod(mode)
    with refused(library, "group or others can write to it"):
        assert kernels_work()
    assert_private_build(tmp_path)
    assert library.read_bytes().startswith(b"not a library")  # left alone: the warning names it


@needs_compiler
def test_a_cached_library_of_another_user_is_refused(fresh, monkeypatch, tmp_path):
    library = build_cache(fresh)
    real_path = str(library.resolve())
    monkeypatch.setattr(
        build.os, "fstat", owned_by_another_user(os.fstat, lambda fd: os.readlink(f"/proc/self/fd/{fd}") == real_path)
    )
    with refused(library, f"owned by uid {os.getuid() + 1}"):
        assert kernels_work()
    assert_private_build(tmp_path)


@needs_compiler
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-library", "dangling"])
def test_a_symlinked_library_is_refused(fresh, tmp_path, dangling):
    library = build_cache(fresh)
    elsewhere = tmp_path / "elsewhere.so"
    library.rename(elsewhere)  # a good library of this user's: a link to it is refused all the same
    if dangling:
        elsewhere.unlink()
    library.symlink_to(elsewhere)
    with refused(library, "symbolic link"):
        assert kernels_work()
    assert_private_build(tmp_path)
    assert library.is_symlink()


def wrapper_script(directory: Path) -> tuple[Path, Path]:
    """A compiler wrapper (as ``ccache``) that logs its arguments and runs them; returns it and its log."""
    directory.mkdir(parents=True)
    log, wrapper = directory / "calls.log", directory / "wrap.sh"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


@needs_compiler
def test_cc_may_be_a_command_with_arguments(fresh, monkeypatch, tmp_path):
    wrapper, log = wrapper_script(tmp_path / "a dir with spaces")  # quoted in $CC as a shell would need it
    monkeypatch.setenv("CC", f'"{wrapper}" {SYSTEM_CC}')
    assert build.compiler_command() == [str(wrapper), SYSTEM_CC]
    assert kernels_work()
    assert log.read_text().startswith(f"{SYSTEM_CC} {' '.join(QUICK)} -o ")
    # The whole command is part of the cache key: the same compiler without the wrapper builds anew.
    assert loaded_from().name == build.library_name([str(wrapper), SYSTEM_CC], QUICK)
    assert build.library_name([SYSTEM_CC], QUICK) != loaded_from().name


@pytest.mark.skipif(shutil.which("ccache") is None, reason="ccache is not installed")
@needs_compiler
def test_ccache_gcc_builds_the_kernels(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", f"ccache {SYSTEM_CC}")
    monkeypatch.setenv("CCACHE_DIR", str(tmp_path / "ccache"))
    assert kernels_work()


def test_an_unsplittable_cc_takes_the_eager_path(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", 'gcc "unclosed')
    with caplog.at_level(logging.WARNING, logger="lit_prune.backends.cpu.build"):
        assert not cpu_kernels.available()
    assert "$CC cannot be split" in caplog.text


def test_without_a_compiler_the_eager_path_is_used(fresh, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="lit_prune.backends.cpu.build"):
        assert not cpu_kernels.available()
    assert "building the CPU kernels failed" in caplog.text
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 7))
    pruning = Pruning(net, PruningHParams(), sparsity=0.5)
    pruning.mask_update(0)
    assert float(pruning.model_sparsity()) == pytest.approx(0.5, abs=0.01)


def test_native_can_be_switched_off(fresh, monkeypatch):
    monkeypatch.setenv("LIT_PRUNE_NATIVE", "0")
    assert not cpu_kernels.available()
    assert not cpu_kernels.eligible(torch.ones(3))
    assert not fresh.exists()


def test_a_misspelt_native_switch_is_an_error(fresh, monkeypatch):
    monkeypatch.setenv("LIT_PRUNE_NATIVE", "false")
    with pytest.raises(ValueError, match="LIT_PRUNE_NATIVE must be '0' .* got 'false'"):
        cpu_kernels.available()
    with pytest.raises(ValueError, match="LIT_PRUNE_NATIVE"):  # when pruning is set up, before training
        Pruning(torch.nn.Linear(4, 4), PruningHParams())
    with pytest.raises(ValueError, match="LIT_PRUNE_NATIVE"):
        PruningCallback(PruningHParams())
    assert cpu_kernels.native_enabled is build.native_enabled


@needs_compiler
@pytest.mark.parametrize("refused_flag", ["-fopenmp", build.PREFER_512])
def test_a_compiler_that_refuses_an_optional_flag_still_builds_the_kernels(fresh, monkeypatch, tmp_path, refused_flag):
    if refused_flag not in QUICK:
        pytest.skip(f"{refused_flag} is not used here")
    wrapper = tmp_path / "cc-without-it"
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = {refused_flag} ] && exit 1; done\nexec {SYSTEM_CC} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert kernels_work()
    assert len(list(fresh.iterdir())) == 1  # only the build that worked


def test_the_fallback_flag_sets_drop_one_option_at_a_time(monkeypatch):
    monkeypatch.setattr(build, "FLAGS", ("-O3", "-fopenmp", build.PREFER_512))
    assert build.flag_sets() == [("-O3", "-fopenmp", build.PREFER_512), ("-O3", "-fopenmp"), ("-O3",)]
    monkeypatch.setattr(build, "FLAGS", ("-O3", "-fopenmp"))  # not x86: no 512-bit preference to drop
    assert build.flag_sets() == [("-O3", "-fopenmp"), ("-O3",)]


@needs_compiler
def test_the_kernels_build_where_a_compiler_exists(tmp_path):
    # Without this, a C error would turn every kernel test into a skip and the engine into its eager path.
    try:
        library = build.build([SYSTEM_CC], build.FLAGS, tmp_path / "cache")
    except subprocess.CalledProcessError as error:
        pytest.fail(f"the CPU kernels do not compile:\n{error.stderr.decode(errors='replace')[-2000:]}")
    assert build.library_problem(library) is None
    assert build.directory_problem(tmp_path / "cache") is None
    if build.native_enabled():
        assert cpu_kernels.available()


@pytest.mark.slow
def test_nothing_is_built_at_import(tmp_path):
    cache = tmp_path / "cache"
    code = "import lit_prune, lit_prune.backends.cpu.kernels as k; assert k._library.cache_info().currsize == 0"
    env = {**os.environ, "LIT_PRUNE_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert not cache.exists()
