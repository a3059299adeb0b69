"""An optimized HLO module's text as data: its computations, their instructions (name, shape, opcode,
operands, attributes) and the few readers every analysis needs (array bytes and dimensions, callees,
op names). No analysis here: `plan.hlo` (collectives, loops, kernels) and `plan.hlo_cost` (FLOPs, HBM
bytes) read what this parses.
"""
from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
               "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128,
               "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e4m3": 8,
               "f8e3m4": 8, "f4e2m1fn": 4, "f8e8m0fnu": 8, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|branch_computations|true_computation|false_computation)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")

# ------------------------------------------------------------------------------------------ parsing

@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool
    args: str = ""  # the text between the opcode's parentheses (a constant's literal)


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    instructions: dict[str, Instruction]
    root: Instruction | None = None


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at `start`."""
    opening, closing = text[start], {"(": ")", "{": "}", "[": "]"}[text[start]]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _instruction(line: str) -> Instruction | None:
    match = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode_match = re.match(r"([\w\-]+)\(", rest)
    if not opcode_match:
        return None
    open_at = opcode_match.end() - 1
    close_at = _matching(rest, open_at)
    operands = re.findall(r"%([\w.\-]+)", rest[open_at:close_at])
    if not operands:  # HLO printed without '%': names are the words that are not types or literals
        operands = [w for w in re.findall(r"([A-Za-z_][\w.\-]*)", rest[open_at + 1:close_at - 1]) if w not in _DTYPE_BITS]
    return Instruction(match.group(2), shape, opcode_match.group(1), operands, rest[close_at:], bool(match.group(1)),
                       rest[open_at + 1:close_at - 1])


_STATEMENT = re.compile(r"\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*\S|(ENTRY\s+)?%?[\w.\-]+\s.*\{\s*$|HloModule\b|\}\s*$|\s*$")


def _statements(text: str) -> list[str]:
    """The module's lines with continuation lines joined to the statement they continue: a Mosaic kernel's
    backend_config can hold a string with line breaks (its xprof metadata), whose lines may even start with
    '}' and would otherwise end the computation early and lose its ROOT."""
    out: list[str] = []
    for line in text.splitlines():
        if out and not _STATEMENT.match(line):
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def parse(text: str) -> dict[str, Computation]:
    """The computations of an HLO module's text, by name."""
    computations: dict[str, Computation] = {}
    current: Computation | None = None
    for line in _statements(text):
        if current is None:
            header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
            if header and not line.startswith((" ", "HloModule")):
                current = Computation(header.group(2), bool(header.group(1)), {})
            continue
        if line.startswith("}"):
            computations[current.name] = current
            current = None
            continue
        inst = _instruction(line)
        if inst is not None:
            current.instructions[inst.name] = inst
            if inst.root:
                current.root = inst
    return computations


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape (a tuple counts all its arrays)."""
    bits = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits += _DTYPE_BITS.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
    return bits // 8


def arrays(shape: str) -> list[str]:
    return [f"{t}[{d}]" for t, d in _ARRAY.findall(shape)]


def callee(attrs: str, key: str) -> str | None:
    match = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return match.group(1) if match else None


def callees(inst: Instruction) -> list[tuple[str, str]]:
    """(attribute, computation) pairs an instruction calls."""
    out = []
    for key, value in _CALLS.findall(inst.attrs):
        for name in re.findall(r"%?([\w.\-]+)", value.strip("{}")):
            out.append((key, name))
    return out


def op_name(attrs: str) -> str:
    match = re.search(r'op_name="([^"]*)"', attrs)
    return match.group(1) if match else ""


def dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []
