"""csrc/check_isa_objects.py, the checks the build runs on the per-instruction-set kernel objects:
each fed small objects compiled here that break (or keep) its rule."""
from __future__ import annotations

import importlib.util
import pathlib
import platform
import shutil
import subprocess
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "check_isa_objects.py"
_TOOLS = {name: shutil.which(name) for name in ("cc", "nm", "objdump")}

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not all(_TOOLS.values()),
    reason="needs an x86-64 machine with cc, nm and objdump (the tools the build's check uses)",
)

# A vector instruction the compiler does not see (inline asm, no clobber named: ymm1 is scratch at
# every call), so it adds no vzeroupper of its own.
_DIRTY = 'asm volatile("vpxor %ymm1, %ymm1, %ymm1");'
_CLEAN = 'asm volatile("vpxor %ymm1, %ymm1, %ymm1\\n\\tvzeroupper");'


def _check():
    spec = importlib.util.spec_from_file_location("check_isa_objects", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _object(tmp_path: pathlib.Path, name: str, source: str) -> str:
    c, o = tmp_path / f"{name}.c", tmp_path / f"{name}.o"
    c.write_text(source)
    subprocess.run([_TOOLS["cc"], "-O2", "-mavx2", "-c", str(c), "-o", str(o)], check=True)
    return str(o)


def _run(*objects: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(_SCRIPT), "--nm", _TOOLS["nm"], f"--objdump={_TOOLS['objdump']}",
         "--objects", "|".join(objects) + "|"],
        capture_output=True, text=True,
    )


def test_an_entry_point_that_returns_with_dirty_upper_halves_fails_the_build(tmp_path):
    dirty = _object(tmp_path, "dirty", f"void entry(void) {{ {_DIRTY} }}\n")
    done = _run(dirty)
    assert done.returncode != 0 and "upper halves dirty" in done.stderr and "entry" in done.stderr


def test_a_vzeroupper_before_the_return_passes(tmp_path):
    assert _run(_object(tmp_path, "clean", f"void entry(void) {{ {_CLEAN} }}\n")).returncode == 0


def test_a_dirty_callee_counts_for_its_caller_and_a_vzeroupper_after_the_call_clears_it(tmp_path):
    inner = f"__attribute__((noinline)) static void inner(void) {{ {_DIRTY} }}\n"
    # Only entry can be reached from outside: inner (called by entry) may return dirty.
    caught = _run(_object(tmp_path, "call", inner + "void entry(int n) { for (int i = 0; i < n; ++i) inner(); }\n"))
    assert caught.returncode != 0 and "entry" in caught.stderr and "inner" not in caught.stderr
    cleared = inner + 'void entry(int n) { for (int i = 0; i < n; ++i) inner(); asm volatile("vzeroupper"); }\n'
    assert _run(_object(tmp_path, "cleared", cleared)).returncode == 0


def test_a_tail_call_to_a_dirty_function_is_a_dirty_return(tmp_path):
    source = (f"__attribute__((noinline)) static void inner(int n) {{ if (n) {{ {_DIRTY} }} }}\n"
              "void entry(int n) { inner(n + 1); }\n")
    obj = _object(tmp_path, "tail", source)
    functions = _check()._functions(_TOOLS["objdump"], obj)
    assert any(i.jump and i.callee == "inner" for i in functions["entry"]), "the compiler did not tail-call"
    done = _run(obj)
    assert done.returncode != 0 and "entry" in done.stderr


def test_a_weak_symbol_outside_an_isa_namespace_fails_the_build(tmp_path):
    weak = _object(tmp_path, "weak", "__attribute__((weak)) int shared(int x) { return x + 1; }\n")
    done = _run(weak)
    assert done.returncode != 0 and "weak symbols" in done.stderr and "shared" in done.stderr
