"""Stage kernels: which Jupyter kernel runs the stages, and the private folder of each kernel's
connection file and Unix sockets (removed afterwards; what killed runs left is cleaned up)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import CaselessStrEnum, default

from fraudlib.runner.errors import RunSetupError

KERNEL_FOR_THIS_VENV = "fraudlib"  # registered by `make setup` (ipykernel install --sys-prefix)


def choose_kernel(requested: str | None = None) -> str:
    """The Jupyter kernel the stages run in: ``requested`` when given, else one running this interpreter.

    ``fraudlib`` (registered in the venv by ``make setup``) when its command is this Python;
    else ``python3``, whose ``python`` command jupyter_client replaces with this interpreter.
    """
    if requested:
        return requested
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    here = Path(sys.executable).absolute()
    for name in (KERNEL_FOR_THIS_VENV, "python3"):
        try:
            command = manager.get_kernel_spec(name).argv[0]
        except NoSuchKernel:
            continue
        if command in {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]} \
                or Path(command).absolute() == here:
            return name
    raise RunSetupError(
        f"no Jupyter kernel runs this interpreter ({here}): register one with "
        f"`{here} -m ipykernel install --sys-prefix --name {KERNEL_FOR_THIS_VENV}` or pass --kernel NAME"
    )


class UnixSocketKernelManager(AsyncKernelManager):
    """Stage kernels talk over Unix sockets, not over loopback TCP in plain text that any local
    user could read (ipykernel warned about it at the top of every stage's output).

    Left alone, jupyter_client names the sockets ``kernel-ipc-1`` ... ``-5`` relative to the
    working directory (the notebooks folder): two runs at once then bind the same names and
    talk to each other's kernels, and a killed run leaves the files there. ``for_folder`` gives
    a manager whose connection file and sockets live in one private folder instead.
    """

    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    @classmethod
    def for_folder(cls, folder: Path) -> type[UnixSocketKernelManager]:
        class PrivateFolderKernelManager(cls):
            @default("connection_file")
            def _private_connection_file(self) -> str:
                return str(folder / "kernel.json")  # the sockets: <folder>/kernel-ipc-1 ... -5

        return PrivateFolderKernelManager


KERNEL_RUNTIME_PREFIX = "fraud-kernels-"  # <tempdir>/fraud-kernels-<runner pid>-<random>/
_UNIX_SOCKET_PATH_MAX = 107  # sun_path on Linux, less the terminating NUL
_STALE_SOCKET = re.compile(r"kernel(-[0-9a-f-]+)?-ipc-\d+")


def kernel_runtime_folders(pid: int | None = None) -> list[Path]:
    """The kernel runtime folders of the runner process ``pid`` (all runners when None)."""
    pattern = f"{KERNEL_RUNTIME_PREFIX}{pid if pid is not None else '*'}-*"
    return sorted(p for p in Path(tempfile.gettempdir()).glob(pattern) if p.is_dir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_kernel_files(*notebooks_dirs: Path) -> list[Path]:
    """Removes what killed runs left: kernel runtime folders whose runner process is gone, and
    (from runners before the private folders) ``kernel-ipc-N`` sockets in ``notebooks_dirs``
    that no kernel listens on. Returns what it removed."""
    removed = []
    for folder in kernel_runtime_folders():
        pid = folder.name[len(KERNEL_RUNTIME_PREFIX):].split("-", 1)[0]
        try:
            owned = folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if pid.isdigit() and owned and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for path in (p for d in notebooks_dirs if Path(d).is_dir() for p in Path(d).iterdir()):
        if _STALE_SOCKET.fullmatch(path.name) and _is_dead_socket(path):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _is_dead_socket(path: Path) -> bool:
    """True for a Unix socket file nothing listens on (connecting is refused)."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return exc.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return False


@contextlib.contextmanager
def kernel_runtime_folder():
    """A private folder (0700, in the system temp dir) for one kernel's connection file and
    sockets, removed afterwards; short enough for Unix socket paths."""
    folder = Path(tempfile.mkdtemp(prefix=f"{KERNEL_RUNTIME_PREFIX}{os.getpid()}-"))
    try:
        longest = folder / "kernel-ipc-99"
        if len(os.fsencode(longest)) > _UNIX_SOCKET_PATH_MAX:
            raise RunSetupError(f"the kernel socket path {longest} is longer than Unix sockets allow "
                                f"({_UNIX_SOCKET_PATH_MAX} bytes): set TMPDIR to a shorter folder")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)

