"""Test shim, on PYTHONPATH only in the tests that set it (the fault tests of
tests/workflow/test_workflow.py); it changes nothing unless one of these variables is set:

- SEPEN_TEST_SLOW_SAVE=<seconds>: every accelerate checkpoint save waits that long after
  writing its files, so that a test can kill a finetuning job while a checkpoint is saved.
- SEPEN_TEST_KILL_AFTER_IMAGES=<N> with SEPEN_TEST_KILL_MARKER=<path>: the first process that
  has put its N-th sample image (`seed-*.png`, under a path holding SEPEN_TEST_KILL_WHERE if
  that is set) in place creates the marker (exclusively, with its command line as JSON) and
  dies by SIGKILL, as a preempted job does. Every later process finds the marker and runs
  normally: a job that fails once.
- SEPEN_TEST_SLOW_WRITE=<seconds>: `Path.write_bytes` writes the first half of the data,
  waits that long, then writes the rest, so that a reader can look at a file being written.
"""

import os

if os.environ.get("SEPEN_TEST_SLOW_SAVE"):
    import time

    import accelerate

    _save_state = accelerate.Accelerator.save_state

    def _slow_save_state(self, *args, **kwargs):
        result = _save_state(self, *args, **kwargs)
        time.sleep(float(os.environ["SEPEN_TEST_SLOW_SAVE"]))
        return result

    accelerate.Accelerator.save_state = _slow_save_state

if os.environ.get("SEPEN_TEST_KILL_AFTER_IMAGES"):
    import json
    import signal
    import sys

    _replace = os.replace
    _placed = []

    def _replace_then_maybe_die(src, dst, *args, **kwargs):
        result = _replace(src, dst, *args, **kwargs)
        name = os.path.basename(os.fspath(dst))
        where = os.environ.get("SEPEN_TEST_KILL_WHERE", "")
        if name.startswith("seed-") and name.endswith(".png") and where in os.fspath(dst):
            _placed.append(os.fspath(dst))
            if len(_placed) == int(os.environ["SEPEN_TEST_KILL_AFTER_IMAGES"]):
                try:
                    marker = os.environ["SEPEN_TEST_KILL_MARKER"]
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return result
                os.write(fd, json.dumps({"argv": sys.argv, "placed": _placed}).encode())
                os.fsync(fd)
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    os.replace = _replace_then_maybe_die

if os.environ.get("SEPEN_TEST_SLOW_WRITE"):
    import pathlib
    import time

    def _slow_write_bytes(self, data):
        view = memoryview(data)
        with open(self, "wb") as f:
            f.write(view[: len(view) // 2])
            f.flush()
            time.sleep(float(os.environ["SEPEN_TEST_SLOW_WRITE"]))
            f.write(view[len(view) // 2 :])
        return len(view)

    pathlib.Path.write_bytes = _slow_write_bytes
