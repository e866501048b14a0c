#!/usr/bin/env python3
"""Per-step timeline of decode graph replays from a kernel trace (`run.sh timeline`).

Reads the "start_ns end_ns stream name" lines that trace/kernel_trace.c (a CUPTI injection
library) wrote while `bench_gpu --step-parts` ran, graph nodes included. Cuts the kernels into
steps (a step starts at the `embed` kernel) and groups consecutive steps with the same number of
kernels into configurations (the runs of at least LAST steps are LORAPLANE_PARTS's graph
replays, in order). For the last LAST steps of each it prints: the step's span, how long at
least one kernel ran (busy) and how long none did (idle: dependency and launch latency between
kernels), the kernels' summed time (above busy: kernels overlapping), and each kernel name's
mean duration and count per step. CUPTI reports a graph's nodes on the graph's own streams, so
the trace cannot tell the main stream from the side stream; comparing configurations' rows says
whether a step got longer through slower kernels (sharing SMs) or through idle time (joins).

For steps with adapters it also lines up each group's base GEMM (q/k/v, o, gate/up, down, in
that order in every layer; a split-k reduce belongs to the GEMM before it) with its LoRA chain
(the group's shrink and expand, the side stream's kernels in the same order): the GEMM's time,
the chain's time from the shrink's start to the expand's end, and by how much the expand ended
after the GEMM, which is how long the join held the main stream.

Then, for every run of at least BETWEEN steps (whole steps, overlapped steps and graph replays
alike), what the stream does between the end of one step's last GEMM (the LM head) and the next
step's embedding: each kernel and memory copy there with its mean start after the one before and
its mean duration, and the step's period (embedding to embedding).
"""
import collections
import sys

LAST = 40
BETWEEN = 20


def main(trace_path, labels):
    rows = []
    with open(trace_path) as f:
        for line in f:
            start, end, stream, name = line.split(maxsplit=3)
            rows.append((int(start), int(end), int(stream), name.strip()))
    rows.sort()
    steps, cur = [], None
    for start, end, stream, name in rows:
        if name.startswith("embed"):
            cur = []
            steps.append(cur)
        if cur is not None:
            cur.append((start, end, name))
    runs = []
    for st in steps:
        if runs and len(runs[-1][-1]) == len(st):
            runs[-1].append(st)
        else:
            runs.append([st])
    groups = [r for r in runs if len(r) >= LAST]
    between_steps(steps, runs)
    print(f"{len(steps)} steps, {len(groups)} runs of {LAST} or more (labels: {' '.join(labels)})")
    for gi, g in enumerate(groups):
        label = labels[gi] if gi < len(labels) else f"run {gi + 1}"
        g = g[-LAST:]
        span = busy = summed = 0.0
        gaps = 0
        per = collections.defaultdict(list)
        for st in g:
            t0, t1 = st[0][0], max(k[1] for k in st)
            span += t1 - t0
            covered, edge = 0, t0
            for s, e, name in st:
                per[name].append(e - s)
                summed += e - s
                if s > edge:
                    gaps += 1
                if e > edge:
                    covered += e - max(s, edge)
                    edge = e
            busy += covered
        n = len(g)
        print(f"\n== {label}: {n} steps, {len(g[-1])} kernels a step")
        print(f"   span {span / n / 1e6:.3f} ms, busy {busy / n / 1e6:.3f} ms, idle {(span - busy) / n / 1e6:.3f} ms "
              f"in {gaps / n:.0f} gaps, kernels summed {summed / n / 1e6:.3f} ms")
        c = chains(g)
        if c:
            print("   group     GEMM us  LoRA chain us  expand ends after the GEMM, us (per layer)")
            for name in GROUPS:
                gm, ch, wait = c[name][:3]
                print(f"   {name:8} {gm:8.2f} {ch:14.2f} {wait:10.2f}")
            print("   from the GEMM's start, us: shrink start / end, expand start / end, GEMM end")
            for name in GROUPS:
                print(f"   {name:8} " + " ".join(f"{v:7.2f}" for v in c[name][3:]))
        print("   per step us  mean us  count  kernel")
        for name, d in sorted(per.items(), key=lambda kv: -sum(kv[1])):
            print(f"   {sum(d) / n / 1e3:11.1f}  {sum(d) / len(d) / 1e3:7.2f}  {len(d) / n:5.0f}  {name[:80]}")


GROUPS = ("q/k/v", "o", "gate/up", "down")


def between_steps(steps, runs):
    """Prints, per run of BETWEEN or more steps, the records from the LM head's end to the next
    step's embedding (the last 16 steps that have a next one)."""
    print(f"\nBetween steps (runs of {BETWEEN} or more; gap: start after the previous record's end, us)")
    first = 0
    for r in runs:
        idx = list(range(first, first + len(r)))
        first += len(r)
        if len(r) < BETWEEN:
            continue
        idx = [i for i in idx if i + 1 < len(steps)][-16:]
        period, tail_rows, lead = 0.0, None, 0.0
        for i in idx:
            st, nxt = steps[i], steps[i + 1]
            period += nxt[0][0] - st[0][0]
            head = max(j for j, k in enumerate(st) if is_gemm(k[2]))
            tail = st[head + 1:] + [nxt[0]]
            if tail_rows is None:
                tail_rows = [[name, 0.0, 0.0] for _, _, name in tail]
            edge = st[head][1]
            lead += st[head][1] - st[0][0]
            for row, (s, e, name) in zip(tail_rows, tail):
                row[1] += s - edge
                row[2] += e - s
                edge = max(edge, e)
        n = len(idx)
        print(f"-- {len(r)} steps of {len(r[0])} records: period {period / n / 1e3:.1f} us, "
              f"embedding to the LM head's end {lead / n / 1e3:.1f} us")
        for name, gap, dur in tail_rows:
            print(f"   gap {gap / n / 1e3:6.1f}  dur {dur / n / 1e3:6.1f}  {name[:70]}")


def is_gemm(name):
    return name.startswith(("decode_gemm", "nvjet", "sm90_xmma", "cutlass")) or "gemm" in name.lower()


def chains(steps):
    """Per group: mean GEMM us, LoRA chain us, expand end after GEMM end us (0 if before), then
    the shrink's start and end, the expand's start and end and the GEMM's end, each from the
    GEMM's start (us)."""
    acc = collections.defaultdict(lambda: [0.0] * 8 + [0])
    for st in steps:
        shrinks = [k for k in st if k[2].startswith("lora_shrink")]
        expands = [k for k in st if k[2].startswith("lora_expand")]
        gemms = []
        for k in st:
            if "splitKreduce" in k[2] and gemms:
                gemms[-1] = (gemms[-1][0], max(gemms[-1][1], k[1]), gemms[-1][2])
            elif is_gemm(k[2]):
                gemms.append(k)
        layers = len(expands) // 4
        if layers == 0 or len(shrinks) != 4 * layers or len(gemms) < 4 * layers:
            return None
        for i in range(4 * layers):
            g, sh, ex = gemms[i], shrinks[i], expands[i]
            a = acc[GROUPS[i % 4]]
            a[0] += g[1] - g[0]
            a[1] += ex[1] - sh[0]
            a[2] += max(0, ex[1] - g[1])
            for j, t in enumerate((sh[0], sh[1], ex[0], ex[1], g[1])):
                a[3 + j] += t - g[0]
            a[8] += 1
    return {k: tuple(x / v[8] / 1e3 for x in v[:8]) for k, v in acc.items()}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
