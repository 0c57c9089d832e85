"""`vision-triton`: start the Triton server (server.py) in its own virtualenv and stop it cleanly.

This runs in the product virtualenv and never imports pytriton: pytriton needs numpy<2, so the
server lives in `.venv-triton` (made by `make triton-venv`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from triton_serve import options

PACKAGE_DIR = Path(__file__).resolve().parent
VENV_HINT = (
    "vision-triton: the Triton server needs its own virtualenv; run 'make triton-venv'"
    " (it has pytriton and numpy<2)"
)
STOP_GRACE_S = 15.0  # after SIGTERM the server has this long before its process group is killed


def find_python() -> Path | None:
    """The Triton virtualenv's interpreter: $VISION_TRITON_PYTHON, else .venv-triton in repo or cwd."""
    explicit = os.environ.get("VISION_TRITON_PYTHON")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    for root in (PACKAGE_DIR.parent, Path.cwd()):
        candidate = root / ".venv-triton" / "bin" / "python"
        if candidate.is_file():
            return candidate
    return None


def library_dir(python: Path) -> str:
    """The interpreter's LIBDIR, where pytriton's backend stub finds libpython."""
    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def server_env(python: Path) -> dict[str, str]:
    """The environment for server.py: LD_LIBRARY_PATH led by the interpreter's LIBDIR."""
    env = dict(os.environ)
    libdir = library_dir(python)
    if libdir:
        rest = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{libdir}:{rest}" if rest else libdir
    env.pop("PYTHONPATH", None)  # the product's paths would bring numpy 2 into the Triton venv
    return env


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left in the server's process group (tritonserver included)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_server(python: Path, argv: list[str]) -> int:
    """Run server.py in its own process group, forward SIGTERM/SIGINT, return its exit code.

    After a forwarded signal the server has STOP_GRACE_S to exit; then, and in any case once it
    has exited, its whole process group is killed so no tritonserver outlives the launcher.
    """
    command = [str(python), str(PACKAGE_DIR / "server.py"), *argv]
    proc = subprocess.Popen(command, env=server_env(python), start_new_session=True)
    pgid = proc.pid  # start_new_session: the child leads its own process group
    deadline: list[float] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not deadline:
            deadline.append(time.monotonic() + STOP_GRACE_S)
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if deadline and time.monotonic() > deadline[0]:
                    print(
                        f"vision-triton: the server did not stop within {STOP_GRACE_S:.0f} s;"
                        " killed it and its tritonserver",
                        file=sys.stderr,
                    )
                    kill_group(pgid)
                    proc.wait()
                    return 1
    finally:
        if proc.poll() is None:  # an exception in the launcher itself
            kill_group(pgid)
            proc.wait()
        kill_group(pgid)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vision-triton`."""
    args_list = sys.argv[1:] if argv is None else argv
    options.parse_args("vision-triton", args_list)  # --help and bad flags answer here, fast
    python = find_python()
    if python is None:
        print(VENV_HINT, file=sys.stderr)
        return 2
    return run_server(python, args_list)


if __name__ == "__main__":
    sys.exit(main())
