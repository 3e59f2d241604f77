"""Test shim (on PYTHONPATH only in tests/test_workflow.py's kill tests): with
SEPEN_TEST_SLOW_SAVE=<seconds>, every accelerate checkpoint save waits that long after writing
its files, so that the test can kill a finetuning job while a checkpoint is being saved."""

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
