"""Global loads whose result is used a few instructions later, in the SASS of one or more kernels: each such use makes
the warp wait for the load's whole latency right there (hundreds of cycles from L2). Session 24's v49, v51 and v52
were three of them at a GEMM's tile switch (a gather entry loaded and clamped at once, each load waiting on the one
before), found by reading SASS by hand; this lists the candidates.

    cuobjdump -sass build/gpu/.../gemm_sm90.cu.o > gemm.sass      (cuobjdump: CUDA toolkit, or triton's bundled copy)
    python scripts/sass_load_uses.py gemm.sass 'gemm_sm90_kernel.*GemmKindE0ELb0ELi2E' [--within 12]

For each LDG (not LDGSTS / cp.async, which do not stall the warp) the first later instruction within --within that
reads its destination register, or 'none'. A load used by a branch or compare on its value is the costly kind: the
warp stops there. (A heuristic: straight-line order of the listing; branches are not followed.)"""
import argparse
import re
import sys

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
REG = re.compile(r"\bR(\d+)\b")


def functions(lines, pattern):
    """{name: [(address, instruction text)]} of the functions whose name matches pattern."""
    out, name = {}, None
    for line in lines:
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            if not re.search(pattern, name):
                name = None
            else:
                out[name] = []
            continue
        if name is None:
            continue
        m = INSN.search(line)
        if m:
            out[name].append((m.group(1), m.group(2)))
    return out


def split(text):
    """(opcode, [operands]) of an instruction, its predicate guard dropped."""
    body = re.sub(r"^@!?U?P\w+\s+", "", text)
    parts = body.split(None, 1)
    return parts[0], ([o.strip() for o in parts[1].split(",")] if len(parts) > 1 else [])


def dest_regs(text):
    """Registers an LDG writes: R<n>, and for .64 / .128 the next one or three."""
    opcode, operands = split(text)
    first = REG.search(operands[0]) if operands else None
    if not first:
        return set()
    n = int(first.group(1))
    width = 4 if ".128" in opcode else 2 if ".64" in opcode else 1
    return {n + i for i in range(width)}


def reads(text, regs):
    """Whether the instruction reads one of regs (any operand after its destination; every operand of a store,
    compare or branch, which write none)."""
    opcode, operands = split(text)
    sources = operands if opcode.startswith(("ST", "RED", "ATOM", "BRA", "ISETP", "FSETP", "BAR")) else operands[1:]
    return any(int(r) in regs for o in sources for r in REG.findall(o))


def writes(text, regs):
    opcode, operands = split(text)
    if not operands or opcode.startswith(("ST", "RED", "BRA", "ISETP", "FSETP", "BAR")):
        return False
    m = REG.search(operands[0])
    return bool(m) and int(m.group(1)) in regs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sass")
    ap.add_argument("function", help="regex on the (mangled) function name")
    ap.add_argument("--within", type=int, default=12, help="instructions after the load to look for a use")
    args = ap.parse_args()
    with open(args.sass) as f:
        fns = functions(f, args.function)
    if not fns:
        print("no function matches", file=sys.stderr)
        return 1
    for name, insns in fns.items():
        print(f"== {name[:150]}")
        for k, (addr, text) in enumerate(insns):
            opcode = split(text)[0]
            if not opcode.startswith("LDG") or opcode.startswith(("LDGSTS", "LDGDEPBAR")):
                continue
            regs = dest_regs(text)
            use = None
            for j in range(k + 1, min(k + 1 + args.within, len(insns))):
                if reads(insns[j][1], regs):
                    use = (j - k, insns[j])
                    break
                if writes(insns[j][1], regs):
                    break
            where = f"used {use[0]} later by /*{use[1][0]}*/ {use[1][1]}" if use else "none"
            print(f"  /*{addr}*/ {text:55.55}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
