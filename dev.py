#!/usr/bin/env python3
"""fdp's one entry point for developers: each command sets up what it needs, then runs.

Usage: python3 dev.py COMMAND [ARGS...]

    example [ARGS...]      train the digits example: examples/train_digits.py ARGS
                           (--help lists its options; the figure goes to digits_loss.png)
    test [--fast] [ARGS]   run the test suite: python -m pytest -n N --dist loadgroup ARGS,
                           N = one pytest-xdist worker per core (at most {workers}; none on 1
                           core, or when ARGS have -n, -p no:xdist, --pdb or --trace).
                           --fast runs the fast subset, pytest {fast}
                           (a -m or -k of your own replaces the subset's)
    lint                   ruff check . , then mypy (its settings: [tool.mypy] in pyproject.toml)
    docs                   build the docs strictly: sphinx-build -W --keep-going -n -b html docs
                           docs/_build/html
    setup                  only create or update the environment; print torch's and fdp's versions

Set-up, done by every command and skipped when nothing changed: a virtual environment (default
.venv in the repository root), {torch} installed first, then fdp in editable mode with its
development extras (pip install -e ".[dev]": test, examples, jax, docs, ruff, mypy). A stamp
file in the environment holds a hash of pyproject.toml, the torch spec and the torch index;
while it matches, pip does not run, so later runs start at once.

Environment variables:
    FDP_VENV             where the virtual environment lives (default: .venv in the repository
                         root; a relative path is taken from the current directory)
    FDP_TORCH_INDEX_URL  the package index torch comes from. Unset: pip's default (PyPI, whose
                         Linux torch wheel is the CUDA build). For the CPU build on Linux:
                         https://download.pytorch.org/whl/cpu ; for a CUDA build, PyTorch's
                         index for that CUDA version. Changing it reinstalls torch (pip
                         uninstall torch, then install from the new index).

Commands run in the repository root (relative paths in ARGS are taken from there) with the
environment's Python, and dev.py exits with the command's exit status. Needs Python 3.10 or
newer with the venv module (on Debian/Ubuntu: apt install python3-venv).
"""

# Kept to syntax that Python 3.6+ parses, so that older Pythons reach the version check below.
import hashlib
import os
import shutil
import subprocess
import sys

MIN_PYTHON = (3, 10)
TORCH_SPEC = "torch==2.13.0"  # the torch release CI tests; keep in step with pyproject.toml
EXTRAS = "dev"  # test + examples + jax + docs + ruff + mypy
STAMP_NAME = ".fdp-dev-stamp"  # hash of everything the set-up depends on
TORCH_STAMP_NAME = ".fdp-dev-torch"  # the torch spec and index torch was installed from

# The fast subset: everything except the heavier sweeps (marked slow), the multi-process
# distributed tests (a pool of 4 gloo ranks), the JAX interop tests and the torch.compile tests
# (compilation dominates their time). About 2¾ minutes on a 2-core machine (2 pytest-xdist
# workers; 3¼ one test at a time, -n 0), against 7 for the whole suite with CI's hypothesis
# profile (15 one test at a time); `dev.py test` (no --fast) runs everything, as CI does.
FAST = ["-m", "not slow", "--ignore=tests/distributed", "--ignore=tests/interop",
        "-k", "not compile"]

# dev.py test runs the tests in parallel, one pytest-xdist worker per core up to this many (each
# worker imports torch and JAX and compiles: up to about 2 GiB of memory apiece)
MAX_WORKERS = 8

ROOT = os.path.dirname(os.path.abspath(__file__))
DOCS_COMMAND = ["-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html", "docs",
                os.path.join("docs", "_build", "html")]

USAGE = __doc__.format(fast=" ".join(f'"{a}"' if " " in a else a for a in FAST),
                       torch=TORCH_SPEC, workers=MAX_WORKERS)


def say(message):
    print("[dev.py] " + message, file=sys.stderr, flush=True)


def fail(message, code=2):
    say("error: " + message)
    sys.exit(code)


def check_python():
    if sys.version_info[:2] < MIN_PYTHON:
        fail(f"fdp needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is "
             f"{sys.version.split()[0]} ({sys.executable}). Run dev.py with a newer python3.")
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError as e:
        fail(f"this Python ({sys.executable}) lacks the venv module or ensurepip ({e}). On "
             "Debian/Ubuntu: apt install python3-venv (or python3.X-venv for your version).")


def venv_dir():
    return os.path.abspath(os.environ.get("FDP_VENV") or os.path.join(ROOT, ".venv"))


def venv_python(venv):
    if os.name == "nt":
        return os.path.join(venv, "Scripts", "python.exe")
    return os.path.join(venv, "bin", "python")


def torch_index():
    return os.environ.get("FDP_TORCH_INDEX_URL", "").strip()


def wanted_stamp():
    digest = hashlib.sha256()
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        digest.update(f.read())
    for part in (TORCH_SPEC, torch_index(), EXTRAS):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def run(cmd, **kwargs):
    """Runs cmd from the repository root; returns its exit status."""
    try:
        return subprocess.call(cmd, cwd=ROOT, **kwargs)
    except KeyboardInterrupt:
        return 130


def pip(python, args):
    code = run([python, "-m", "pip", *args])
    if code != 0:
        fail(f"pip {' '.join(args)} failed (exit {code}). Nothing was marked as installed, so "
             f"the next run retries; if the environment is broken, delete {venv_dir()}.", code)


def ensure_env():
    """Creates or updates the virtual environment; returns its Python."""
    venv = venv_dir()
    python = venv_python(venv)
    stamp = os.path.join(venv, STAMP_NAME)
    wanted = wanted_stamp()
    if os.path.exists(python) and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == wanted:
                return python

    if not os.path.exists(python):
        if os.path.exists(venv):
            if not os.path.exists(os.path.join(venv, "pyvenv.cfg")):
                fail(f"{venv} exists but is not a virtual environment; remove it or set "
                     "FDP_VENV.")
            say(f"{venv} has no Python; recreating it")
            shutil.rmtree(venv)
        say(f"creating the virtual environment {venv} (Python {sys.version.split()[0]})")
        import venv as venv_module

        try:
            venv_module.EnvBuilder(with_pip=True).create(venv)
        except (OSError, subprocess.CalledProcessError) as e:
            fail(f"could not create {venv}: {e}. On Debian/Ubuntu: apt install python3-venv.")
    elif os.path.exists(stamp):
        say(f"pyproject.toml, the torch spec or the torch index changed; updating {venv}")

    index = torch_index()
    torch_stamp = os.path.join(venv, TORCH_STAMP_NAME)
    torch_wanted = f"{TORCH_SPEC} {index or 'default-index'}"
    if os.path.exists(torch_stamp):
        with open(torch_stamp) as f:
            torch_before = f.read().strip()
        if torch_before != torch_wanted:
            # pip keeps an installed torch that satisfies the spec, whichever index it came from
            say(f"torch was installed as {torch_before!r}; reinstalling it as {torch_wanted!r}")
            pip(python, ["uninstall", "--yes", "--quiet", "torch"])
            os.remove(torch_stamp)
    say(f"installing {TORCH_SPEC}" + (f" from {index}" if index else ""))
    pip(python, ["install", "--quiet", TORCH_SPEC] + (["--index-url", index] if index else []))
    with open(torch_stamp, "w") as f:
        f.write(torch_wanted + "\n")
    say(f'installing fdp in editable mode with its extras: pip install -e ".[{EXTRAS}]"')
    # torch is already there and satisfies pyproject's range, so pip keeps that build
    pip(python, ["install", "--quiet", "-e", f".[{EXTRAS}]"])
    with open(stamp, "w") as f:
        f.write(wanted + "\n")
    say(f"environment ready: {venv}")
    return python


def cmd_setup(python, args):
    if args:
        fail("setup takes no arguments")
    return run([python, "-c", "import torch, fdp; print('torch', torch.__version__, "
                "'| fdp', fdp.__version__)"])


def cmd_example(python, args):
    return run([python, os.path.join("examples", "train_digits.py"), *args])


def parallel(args):
    """pytest-xdist's options for ARGS: one worker per core (at most MAX_WORKERS), tests/distributed
    in one of them (conftest.py marks it for --dist loadgroup); none where ARGS choose the
    workers themselves (-n, --numprocesses, -p no:xdist) or need one process (--pdb, --trace)."""
    for a in args:
        if (a.startswith(("-n", "--numprocesses")) or a in ("--pdb", "--trace")
                or a in ("no:xdist", "-pno:xdist")):
            return []
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    workers = min(cores, MAX_WORKERS)
    return ["-n", str(workers), "--dist", "loadgroup"] if workers > 1 else []


def cmd_test(python, args):
    if "--fast" in args:
        args = FAST + [a for a in args if a != "--fast"]
        say("fast subset: pytest " + " ".join(args))
    return run([python, "-m", "pytest", *parallel(args), *args])


def cmd_lint(python, args):
    if args:
        fail("lint takes no arguments")
    say("ruff check .")
    ruff = run([python, "-m", "ruff", "check", "."])
    say("mypy (files and options: [tool.mypy] in pyproject.toml)")
    mypy = run([python, "-m", "mypy"])
    if ruff or mypy:
        failed = [name for name, code in (("ruff", ruff), ("mypy", mypy)) if code]
        say(f"lint failed: {', '.join(failed)}")
    return ruff or mypy


def cmd_docs(python, args):
    if not os.path.exists(os.path.join(ROOT, "docs", "conf.py")):
        fail("docs/conf.py does not exist, so there is no Sphinx site to build yet.", 1)
    code = run([python, *DOCS_COMMAND, *args])
    if code == 0:
        say(f"docs built: {os.path.join(ROOT, 'docs', '_build', 'html', 'index.html')}")
    return code


COMMANDS = {
    "example": cmd_example,
    "test": cmd_test,
    "lint": cmd_lint,
    "docs": cmd_docs,
    "setup": cmd_setup,
}


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(USAGE.strip(), file=sys.stderr)
        fail(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
    check_python()
    python = ensure_env()
    return COMMANDS[command](python, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
