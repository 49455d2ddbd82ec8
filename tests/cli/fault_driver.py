"""Run ``quantduo ARGS...`` and SIGKILL the process just before the N-th call of a function (fault injection).

    python -m tests.cli.fault_driver os.fsync 3 example-pipeline DIR

TARGET is ``module.function`` (``os.fsync``, ``os.rename``, ``quantduo.utils._exchange``, ``shutil.rmtree``, ...).
The kill is a real ``kill -9`` of this process: no Python clean-up, no ``finally`` blocks run.
"""
import importlib
import os
import signal
import sys

from quantduo.cli import main


def kill_before(target: str, n: int) -> None:
    """Replace ``target`` by a wrapper that SIGKILLs this process on its ``n``-th call."""
    module_name, _, name = target.rpartition(".")
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, name, wrapper)


if __name__ == "__main__":
    kill_before(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
