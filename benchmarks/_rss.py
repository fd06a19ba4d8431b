"""Peak resident memory of this process, for the benchmark workers.

``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: Linux keeps a process's high-water mark across
``execve``, so a worker spawned by a parent holding 1.7 GB would report at least 1.7 GB whatever
it used itself. ``VmHWM`` in /proc/self/status belongs to the address space exec created."""

import resource


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is
