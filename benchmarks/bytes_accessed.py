"""What XLA:TPU's "bytes accessed" counts: the train step (as `dmfuse compile` builds it) compiled for
a v5e slice, its cost analysis set beside sums over the optimized HLO's top-level instructions.

Prints every cost-analysis key, then: (a) the sum of operand + result bytes of every instruction of
the ENTRY computation (what a program would move if each kernel read its inputs from HBM and wrote
its result back), (b) the same without parameters, tuples and bitcasts, (c) the split of (a) by
instruction kind, (d) what the state alone is (arguments, read once + written once). If "bytes
accessed" equals (a)/(b), it counts each kernel's operands and results once, with no notion of what
stays in on-chip memory (VMEM) between kernels; docs/fit.md has the conclusions.

  python benchmarks/bytes_accessed.py                                   # the cut-down quickstart step
  python benchmarks/bytes_accessed.py --config configs/quickstart_pretrain.py --overrides batch_size=8
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = ["model.dtype=bfloat16", "model.unet.channel_mults=(1,2)", "model.unet.res_blocks=1",
         "model.unet.attn_res=(8,)", "model.unet.image_size=16", "batch_size=8"]


def entry_instructions(text: str):
    """(opcode/kind, result bytes, operand bytes) of each ENTRY instruction of an HLO module."""
    from dmfuse_jax.commands.compile import _operand_list, shape_bytes

    lines, in_entry = [], False
    for line in text.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
            continue
        if in_entry and line.startswith("}"):
            break
        if in_entry and "=" in line:
            lines.append(line)
    shapes = {}
    out = []
    for line in lines:
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$", line)
        if not m:
            continue
        name, result, op, rest = m.groups()
        shapes[name] = shape_bytes(result)
        operands = re.findall(r"%([\w.\-]+)", _operand_list(rest))
        kind = op
        if op == "fusion":
            k = re.search(r"kind=(\w+)", line)
            kind = f"fusion:{k.group(1) if k else '?'}"
        out.append((kind, shapes[name], sum(shapes.get(o, 0) for o in operands)))
    return out


def all_instructions(text: str) -> int:
    """Operand + result bytes of every instruction of every computation (fusion bodies included),
    parameters and tuple plumbing left out: what a count that ignores fusion would add up."""
    from dmfuse_jax.commands.compile import _operand_list, shape_bytes

    total, shapes = 0, {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$", line)
        if not m:
            continue
        name, result, op, rest = m.groups()
        shapes[name] = shape_bytes(result)
        if op in ("parameter", "tuple", "get-tuple-element", "bitcast", "constant"):
            continue
        total += shapes[name] + sum(shapes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", _operand_list(rest)))
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart_pretrain.py")
    p.add_argument("--overrides", default=";".join(SMALL), help="';'-separated KEY=VALUE")
    p.add_argument("--topology", default="v5e:2x2")
    args = p.parse_args(argv)

    from dmfuse_jax import accelerators as acc
    acc.prepare_libtpu_env(args.topology)
    from dmfuse_jax.commands.compile import train_target
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax import sharding as shd

    config = load_config(args.config, [o for o in args.overrides.split(";") if o])
    mesh = shd.make_mesh(tuple(config.sharding.mesh_shape), devices=acc.tpu_devices(args.topology))
    _, lowered = train_target(config, mesh)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print("cost analysis keys:")
    for k in sorted(cost):
        print(f"  {k!r}: {cost[k]:,.0f}")
    text = compiled.as_text()
    inst = entry_instructions(text)
    skip = ("parameter", "tuple", "get-tuple-element", "bitcast", "constant")
    a = sum(r + o for _, r, o in inst)
    b = sum(r + o for k, r, o in inst if k not in skip)
    print(f"bytes accessed (XLA)                        {cost.get('bytes accessed', float('nan')):,.0f}")
    print(f"(a) sum of operands + results, ENTRY        {a:,.0f}")
    print(f"(b) the same without params/tuples/bitcasts {b:,.0f}")
    by = collections.Counter()
    for k, r, o in inst:
        if k not in skip:
            by[k] += r + o
    print("(c) by kind:")
    for k, v in by.most_common(12):
        print(f"  {k:28s} {v:,.0f}")
    m = compiled.memory_analysis()
    print(f"(d) arguments {m.argument_size_in_bytes:,} + outputs {m.output_size_in_bytes:,} "
          f"= {m.argument_size_in_bytes + m.output_size_in_bytes:,}; temps {m.temp_size_in_bytes:,}")
    e = all_instructions(text)
    print(f"(e) sum of operands + results over every computation, fused ones included: {e:,.0f}")
    from dmfuse_jax.commands.compile import kernel_io_bytes
    print(f"kernel_io_bytes (dmfuse compile's roofline figure; = (b)): {kernel_io_bytes(text):,.0f}")
    print(f"ENTRY instructions: {len(inst)}; while loops: {text.count(' while(')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
