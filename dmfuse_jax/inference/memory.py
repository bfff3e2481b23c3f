"""The memory plan of a `Fuser` bucket: which batch and which UNet passes fit the device, decided
from the compiled executables' own needs before any image runs.

needed = `compiled.memory_analysis()`'s temporaries + outputs + non-param arguments (the params
are on the device already); free = host RAM available to the process on CPU (`MemAvailable`,
capped by a cgroup limit), `bytes_limit - bytes_in_use` of `device.memory_stats()` on GPU and
TPU. A plan fits when needed <= HEADROOM x free: the rest covers what the analysis does not
count (the runtime's own buffers, the host copies of the batch).

Candidates, in order (the first that fits is taken; each is compiled once and the executable
is the one `Fuser.dispatch` runs): the six UNet passes batched at the requested batch (images of
at most BATCHED_MAX_PIXELS), the passes in sequence, then smaller batches in sequence (the batch estimated from the needs
measured so far, checked by compiling it). The fused images are the same whichever is taken
(the same noise per image; float rounding aside).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

HEADROOM = 0.85
PASSES = ("batched", "sequential")
# 'auto' tries the batched passes only up to this many pixels per image (TNO's 576x768 is 442,368):
# batching buys no speed on CPU (256x256: 13.6 s batched, 13.7 s sequential per pair, same run,
# load 19) but costs about 3x the memory (576x768: 7.4 KB against 2.3 KB per pixel); at small
# sizes it keeps today's code path.
BATCHED_MAX_PIXELS = 1 << 19

# (config key, batch, height, width) -> MemoryPlan, for the process (the executables are cached too).
_PLANS: dict[tuple, "MemoryPlan"] = {}


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """How one bucket runs. `batch`: images per executable call (<= `requested`); `passes`: the
    UNet passes ('batched' or 'sequential'); `needed`: bytes the chosen executable needs (when
    nothing fits: the leanest one tried, one image in sequence); `available`: free bytes on
    `device`; `largest_square`: the side of the largest square image that would fit, one image
    in sequence (estimated linearly in the pixels from the leanest executable's needs: at small
    sizes the fixed costs make it an underestimate)."""

    requested: int
    height: int
    width: int
    batch: int
    passes: str
    needed: int
    available: int
    device: str
    largest_square: int
    fits: bool
    ceiling_measured: bool = False  # largest_square from one image in sequence (else: from the plan's own)

    def line(self, what: str | None = None) -> str:
        """One line: the plan, or (not fitting) size, bytes needed, bytes available, largest size."""
        what = what or f"{self.width}x{self.height}"
        if self.fits:
            return (f"{what}: {self.batch} image(s) per call (batch {self.requested} asked), UNet passes "
                    f"{self.passes}; needs {self.needed:,} bytes ({_gib(self.needed)}) of {self.available:,} "
                    f"free ({_gib(self.available)}, {self.device}); the largest square that fits is about "
                    f"{self.largest_square}x{self.largest_square}")
        return (f"{what}: too large for this machine: one image needs {self.needed:,} bytes "
                f"({_gib(self.needed)}), {self.available:,} bytes ({_gib(self.available)}) of "
                f"{self.device} are free; the largest square that fits is about "
                f"{self.largest_square}x{self.largest_square}")


def available_bytes(device=None) -> tuple[int, str]:
    """(free bytes, what they are) on `device` (default: JAX's first device)."""
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        free = _host_available()
        return free, "host RAM"
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.platform} {device.device_kind}"
    return _host_available(), f"{device.platform} (no memory_stats: host RAM)"


def _host_available() -> int:
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        import psutil

        free = int(psutil.virtual_memory().available)
    try:  # a container's memory limit (cgroup v2) can be tighter than the host's
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                free = min(free, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return free


def needed_bytes(compiled, param_bytes: int) -> int:
    """Bytes a compiled executable allocates when it runs: temporaries, outputs and the arguments
    that are not params (already resident), less what aliases."""
    ma = compiled.memory_analysis()
    args = max(int(ma.argument_size_in_bytes) - param_bytes, 0)
    return int(ma.temp_size_in_bytes) + int(ma.output_size_in_bytes) + args - int(getattr(ma, "alias_size_in_bytes", 0))


def _param_bytes(fuser) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(fuser._device_params)))


def largest_square(bytes_per_pixel: float, available: float, multiple: int) -> int:
    """Side (a multiple of `multiple`) of the largest square whose needs, linear in the pixels at
    `bytes_per_pixel`, stay within `available`; 0 when not even one `multiple` square does."""
    side = int(math.sqrt(max(available, 0) / max(bytes_per_pixel, 1e-9)))
    return side // multiple * multiple


def plan(fuser, batch: int, height: int, width: int, ceiling: bool = False) -> MemoryPlan:
    """The `MemoryPlan` of a bucket (see the module docstring); compiles what it tries. `ceiling`:
    size `largest_square` from one image in sequence even when the plan did not need to try it
    (one more compile; for `dmfuse fuse --plan`); otherwise from the leanest executable tried."""
    key = (fuser._key, fuser.passes, batch, height, width)
    if key in _PLANS:
        cached = _PLANS[key]
        if not ceiling or cached.ceiling_measured:
            return cached
    free, device = available_bytes()
    budget = HEADROOM * free
    pbytes = _param_bytes(fuser)
    px = height * width
    multiple = fuser.bucket_multiple()

    def need(b, passes):
        return needed_bytes(fuser._executable(b, height, width, passes), pbytes)

    tried = []
    choice = None
    if fuser.passes != "auto":
        order = (fuser.passes,)
    else:
        order = PASSES if px <= BATCHED_MAX_PIXELS else ("sequential",)
    for passes in order:
        n = need(batch, passes)
        tried.append((batch, passes, n))
        if n <= budget:
            choice = (batch, passes, n)
            break
    if choice is None and batch > 1:
        passes = tried[-1][1]
        per_image = tried[-1][2] / batch
        b = max(1, min(batch - 1, int(budget // per_image)))
        while choice is None:
            n = need(b, passes)
            tried.append((b, passes, n))
            if n <= budget:
                choice = (b, passes, n)
            elif b == 1:
                break
            else:
                b = max(1, min(b - 1, int(b * budget // n)))
    if ceiling and (1, "sequential") not in {(b, p) for b, p, _ in tried}:
        tried.append((1, "sequential", need(1, "sequential")))
    # The leanest executable tried (one image per call when nothing fits) sizes the largest square.
    lean_b, lean_p, lean_n = min(tried, key=lambda t: t[2] / t[0])
    measured = (lean_b, lean_p) == (1, "sequential")
    side = largest_square(lean_n / lean_b / px, budget, multiple)
    if choice is None:
        b, passes, n = min(tried, key=lambda t: t[2])
        result = MemoryPlan(batch, height, width, b, passes, n, free, device, side, False, measured)
    else:
        b, passes, n = choice
        result = MemoryPlan(batch, height, width, b, passes, n, free, device, side, True, measured)
    _PLANS[key] = result
    return result
