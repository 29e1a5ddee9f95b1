"""Cuts a perf trace of CPU 0 into the phases of one proxy thread's bursts (see run).

A burst runs from the moment the scheduler switches the thread in to the moment it switches it
out. Per burst: how long the wake-up waited for the CPU (sched_wakeup -> switch in), the kernel
from switch-in to the return of epoll_wait, user space before the first system call, user space
between system calls, time inside system calls (other than epoll_wait), and user space after the
last call before epoll_wait is entered again. Medians over all bursts, in microseconds, and the
system calls per burst by name.
"""
import collections, os, re, statistics, sys

NAMES = {0: "read", 1: "write", 16: "ioctl", 19: "readv", 20: "writev", 44: "sendto", 45: "recvfrom",
         46: "sendmsg", 47: "recvmsg", 232: "epoll_wait", 233: "epoll_ctl", 275: "splice",
         281: "epoll_pwait", 441: "epoll_pwait2", 202: "futex", 7: "poll", 230: "clock_nanosleep"}
EPOLL = {232, 281, 441}

path, pid, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
line_re = re.compile(r"^\s*(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$")
events = []
for line in open(path):
    m = line_re.match(line)
    if m:
        events.append((int(m.group(1)), float(m.group(2)) * 1e6, m.group(3), m.group(4)))
# The proxy's busiest thread: the most system calls.
calls = collections.Counter(t for t, _, e, _ in events if e == "raw_syscalls:sys_enter" and t in tids)
if not calls:
    print(f"{name}: no system calls of pid {pid} in the trace"); sys.exit()
tid = calls.most_common(1)[0][0]

phases = collections.defaultdict(list)
per_burst = collections.Counter()
bursts = 0
wake = None; t_in = None; epoll_ret = None; last_exit = None; first_done = False
between = 0.0; inside = 0.0; enter = None; nr_in = None; counted = collections.Counter()
for t, ts, ev, rest in events:
    if ev == "sched:sched_wakeup":
        m = re.search(r"pid=(\d+)", rest)
        if m and int(m.group(1)) == tid:
            wake = ts
        continue
    if ev == "sched:sched_switch":
        nxt = re.search(r"next_pid=(\d+)", rest); prv = re.search(r"prev_pid=(\d+)", rest)
        if nxt and int(nxt.group(1)) == tid:
            t_in = ts; epoll_ret = None; last_exit = None; first_done = False
            between = inside = 0.0; counted = collections.Counter()
            if wake is not None:
                phases["wake-up waiting for the CPU"].append(ts - wake)
            wake = None
        elif prv and int(prv.group(1)) == tid and t_in is not None:
            if epoll_ret is not None and first_done:
                bursts += 1
                phases["user, between calls"].append(between)
                phases["inside calls (not epoll)"].append(inside)
                phases["switched in to switched out"].append(ts - t_in)
                per_burst.update(counted)
            t_in = None
        continue
    if t != tid:
        continue
    m = re.match(r"NR (\d+)", rest)
    if not m:
        continue
    nr = int(m.group(1))
    if ev == "raw_syscalls:sys_exit":
        if nr in EPOLL and t_in is not None and epoll_ret is None:
            epoll_ret = ts
            phases["kernel: switch-in to epoll_wait's return"].append(ts - t_in)
        elif enter is not None and nr == nr_in and nr not in EPOLL:
            inside += ts - enter
        last_exit = ts; enter = None
    elif ev == "raw_syscalls:sys_enter":
        if epoll_ret is not None and last_exit is not None:
            if nr in EPOLL:
                if first_done:
                    phases["user, last call to epoll_wait"].append(ts - last_exit)
            elif not first_done:
                phases["user, epoll_wait's return to the first call"].append(ts - epoll_ret)
                first_done = True
            else:
                between += ts - last_exit
        if nr not in EPOLL:
            counted[NAMES.get(nr, str(nr))] += 1
        enter = ts; nr_in = nr

print(f"{name} (thread {tid}, {bursts} bursts): medians in µs")
for k in ["wake-up waiting for the CPU", "kernel: switch-in to epoll_wait's return",
          "user, epoll_wait's return to the first call", "user, between calls",
          "inside calls (not epoll)", "user, last call to epoll_wait", "switched in to switched out"]:
    v = phases.get(k, [])
    if v:
        print(f"  {k:45} {statistics.median(v):7.2f}  (p90 {sorted(v)[int(len(v)*0.9)]:7.2f}, n={len(v)})")
if bursts:
    print("  system calls per burst: " + ", ".join(f"{k} {v/bursts:.2f}" for k, v in per_burst.most_common()))
