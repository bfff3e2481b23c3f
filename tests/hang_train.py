"""Test-only launcher (fault injection): `python tests/hang_train.py STEP ARGS...` runs
`python -m dmfuse_jax.train ARGS...`, but after STEP (and its checkpoint, committed) prints
"HANG at step STEP" and waits until a signal the run watches for (SIGTERM, SIGINT, ...) arrives, then
stops as a preempted run; SIGKILL kills it there. Uses `fit`'s `on_step` callback."""
import functools
import runpy
import sys
import time

from dmfuse_jax.training import trainer


def hang_at(hang_step: int):
    def on_step(step, ckpt, watch) -> bool:
        if step != hang_step:
            return False
        ckpt.wait()
        print(f"HANG at step {step}", flush=True)
        while not watch.requested(step, ckpt):
            time.sleep(0.05)
        return True
    return on_step


if __name__ == "__main__":
    trainer.fit = functools.partial(trainer.fit, on_step=hang_at(int(sys.argv.pop(1))))
    runpy.run_module("dmfuse_jax.train", run_name="__main__", alter_sys=True)
