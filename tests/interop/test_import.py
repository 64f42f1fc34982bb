"""JAX stays optional: importing fdp never imports it, and a missing JAX fails clearly."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_importing_fdp_and_the_bridge_never_imports_jax():
    proc = _run("import sys, fdp, fdp.interop, fdp.interop.jax, fdp.bench.__main__\n"
                "assert not [m for m in sys.modules if m == 'jax' or m.startswith('jax.')], "
                "sorted(m for m in sys.modules if m.startswith('jax'))\n")
    assert proc.returncode == 0, proc.stderr


def test_without_jax_the_bridge_raises_an_import_error_with_the_fix():
    proc = _run("import sys; sys.modules['jax'] = None\n"
                "import torch\n"
                "from fdp.interop.jax import to_jax\n"
                "try:\n"
                "    to_jax({'w': torch.ones(2)})\n"
                "except ImportError as e:\n"
                "    print(e)\n")
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "fdp[jax]"' in proc.stdout


def test_without_jax_the_bench_section_is_skipped_with_a_note():
    proc = _run("import sys; sys.modules['jax'] = None\n"
                "from fdp.bench.__main__ import main\n"
                "raise SystemExit(main(['--only', 'jax', '--quick']))\n")
    assert proc.returncode == 0, proc.stderr
    assert "skipped: JAX is not installed" in proc.stdout
