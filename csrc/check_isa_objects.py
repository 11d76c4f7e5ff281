"""Build checks on the kernel objects built per instruction set, run by CMakeLists.txt before _C links.

* Weak symbols (``nm``): an object built for an instruction set must not define a weak symbol
  outside its own ``isa_*`` namespace (an inline function or a template member compiled with that
  set's instructions). The linker keeps one weak copy for all callers, so baseline code could run
  AVX2 or AVX-512 instructions on a CPU without them (csrc/cpu/aligned_vector.h has the case that did).
* Dirty upper state (``objdump``): a function that baseline code can reach (a global symbol, or
  one the object never calls itself: the kernel tables' entries) must not return with the upper
  halves of the vector registers dirty, i.e. after ymm/zmm instructions (its own, or a callee's that
  returns so) with no vzeroupper between. The caller's SSE code then runs slowed: GCC left the
  vzeroupper out of the int8 kernels' 4 x 4 tiles, and the native step's scalar code after the
  head ran up to 3x slower (bench/results/edge_decode/s66/experiments.txt). Each function's paths
  are followed through its jumps from its entry (an indirect jump ends a path).

Usage: python check_isa_objects.py --nm NM [--objdump OBJDUMP] --objects 'a.o|b.o|...'
Standard library only (it runs inside the isolated build).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

_NAMESPACED = re.compile(r"[0-9]isa_[a-z0-9]+")
_FUNCTION = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_INSTRUCTION = re.compile(r"^\s+([0-9a-f]+):\t(\S+)\s*(.*)$")
_TARGET = re.compile(r"^([0-9a-f]+) <([^>+]+)(\+0x[0-9a-f]+)?>")
_RELOCATION = re.compile(r"R_X86_64_(?:PLT32|PC32)\s+([^\s+-]+)")
_PREFIXES = ("notrack", "bnd", "rep", "repz", "repnz", "lock", "data16", "cs", "ds")


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"check_isa_objects: {' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def defined_symbols(nm: str, obj: str) -> list[tuple[str, str]]:
    """(type letter, name) of every symbol obj defines."""
    rows = (line.split() for line in _run(nm, "--defined-only", obj).splitlines())
    return [(parts[1], parts[2]) for parts in rows if len(parts) == 3]


def weak_symbols_outside(symbols: list[tuple[str, str]]) -> list[str]:
    """Weak (W, V) or unique (u) symbols that lie outside an isa_* namespace."""
    return [name for kind, name in symbols
            if kind in "WVu" and not _NAMESPACED.search(name) and not name.startswith("DW.ref.")]


class _Instruction:
    """One instruction: what it does to the upper state, and where control goes next."""

    def __init__(self, address: int, mnemonic: str, operands: str):
        while mnemonic in _PREFIXES and operands:  # "notrack jmp *%rax", "repz ret"
            mnemonic, _, operands = operands.partition(" ")
            operands = operands.strip()
        self.address = address
        self.wide = "%ymm" in operands or "%zmm" in operands
        self.clean = mnemonic in ("vzeroupper", "vzeroall")
        self.ret = mnemonic.startswith("ret")
        self.call = mnemonic.startswith("call")
        self.jump = mnemonic.startswith("j")
        self.unconditional = mnemonic.startswith("jmp")
        self.callee: str | None = None  # a call or jump to another function
        self.local: int | None = None  # a jump within the function
        target = _TARGET.match(operands)
        if (self.call or self.jump) and target:
            if target.group(3) is None:
                self.callee = target.group(2)
            elif self.jump:
                self.local = int(target.group(1), 16)


def _functions(objdump: str, obj: str) -> dict[str, list[_Instruction]]:
    """obj's functions, their instructions in address order, branch targets resolved (relocations)."""
    functions: dict[str, list[_Instruction]] = {}
    current = None
    for line in _run(objdump, "-dr", "--no-show-raw-insn", obj).splitlines():
        head = _FUNCTION.match(line)
        if head:
            current = functions.setdefault(head.group(2), [])
            continue
        if current is None:
            continue
        relocation = _RELOCATION.search(line)
        if relocation:  # an unresolved call or jump: the relocation names its target
            if current and (current[-1].call or current[-1].jump):
                current[-1].callee, current[-1].local = relocation.group(1), None
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction:
            current.append(_Instruction(int(instruction.group(1), 16), instruction.group(2), instruction.group(3)))
    return functions


def _returns_dirty(code: list[_Instruction], dirty: set[str]) -> bool:
    """Whether some path through code reaches a ret (or a jump to another function) with the upper
    state dirty: ymm/zmm instructions, or a call of a function in `dirty`, since the last vzeroupper."""
    at = {instruction.address: i for i, instruction in enumerate(code)}
    seen: set[tuple[int, bool]] = set()
    work = [(0, False)]
    while work:
        i, state = work.pop()
        if i >= len(code) or (i, state) in seen:
            continue
        seen.add((i, state))
        instruction = code[i]
        if instruction.clean:
            state = False
        elif instruction.wide or (instruction.call and instruction.callee in dirty):
            state = True
        if instruction.ret or (instruction.jump and instruction.callee is not None):
            if state or instruction.callee in dirty:
                return True
            continue
        if instruction.local is not None and instruction.local in at:
            work.append((at[instruction.local], state))
        if not instruction.unconditional:
            work.append((i + 1, state))
    return False


def dirty_entries(objdump: str, symbols: list[tuple[str, str]], obj: str) -> list[str]:
    """The functions of obj that baseline code can reach and that may return with dirty upper state."""
    functions = _functions(objdump, obj)
    dirty: set[str] = set()
    changed = True
    while changed:  # a callee that returns dirty makes its callers' paths dirty from the call on
        changed = False
        for name, code in functions.items():
            if name not in dirty and _returns_dirty(code, dirty):
                dirty.add(name)
                changed = True
    called = {i.callee for code in functions.values() for i in code if i.callee is not None}
    exported = {name for kind, name in symbols if kind in "TW"}
    return sorted(name for name in dirty if name in exported or name not in called)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nm", required=True)
    parser.add_argument("--objdump", default="")
    parser.add_argument("--objects", required=True, help="object files joined by '|'")
    args = parser.parse_args()
    weak, dirty = [], []
    for obj in filter(None, args.objects.split("|")):
        symbols = defined_symbols(args.nm, obj)
        weak += [f"{obj}: {name}" for name in weak_symbols_outside(symbols)]
        if args.objdump:
            dirty += [f"{obj}: {name}" for name in dirty_entries(args.objdump, symbols, obj)]
    problems = []
    if weak:
        problems.append("kernel objects define weak symbols outside their isa_* namespace; give them one "
                        "baseline copy (extern template, as csrc/cpu/aligned_vector.h does):\n  " + "\n  ".join(weak))
    if dirty:
        problems.append("kernel entry points may return with the vector registers' upper halves dirty; end "
                        "them in _mm256_zeroupper() (as csrc/cpu/isa/int8_dot.cpp's rows does):\n  "
                        + "\n  ".join(dirty))
    if problems:
        sys.exit("check_isa_objects: " + "\ncheck_isa_objects: ".join(problems))


if __name__ == "__main__":
    main()
