"""Runs command lines (`python -m MODULE ARGS...`) one after another in this one process, for tests that
check many command lines' messages and exit codes: Python, JAX and Hydra are imported once instead of
once per command (about 3 s each on 2 cores).

Each request is a JSON line on stdin, {"module", "args", "cwd"}; each reply a JSON line,
{"returncode", "stdout", "stderr"}. A command runs as `python -m` runs it (runpy, as __main__, with
sys.argv set), its file descriptors 1 and 2 redirected, so a message printed by Python, a logging handler
or C code is captured alike. Between commands the process state a command line may change is put back:
Hydra's global state, the root logger's handlers, the signal handlers and the working directory.
"""
from __future__ import annotations

import json
import logging
import os
import runpy
import signal
import sys
import tempfile
import traceback


def _exit_code(e: SystemExit) -> int:
  if e.code is None:
    return 0
  if isinstance(e.code, int):
    return e.code
  print(e.code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits with 1
  return 1


def run_one(module: str, args: list[str], cwd: str) -> dict:
  from hydra.core.global_hydra import GlobalHydra

  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
  saved_fds = os.dup(1), os.dup(2)
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.argv = [module, *args]
    os.chdir(cwd)
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      code = _exit_code(e)
    except BaseException:  # noqa: BLE001  an uncaught exception: Python prints the traceback and exits with 1
      traceback.print_exc()
      code = 1
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved_fds[0], 1)
      os.dup2(saved_fds[1], 2)
      for fd in saved_fds:
        os.close(fd)
      GlobalHydra.instance().clear()
      root = logging.getLogger()
      for handler in list(root.handlers):  # the run's file handler would catch the next command's lines
        root.removeHandler(handler)
        handler.close()
      for s, handler in handlers.items():
        signal.signal(s, handler)
    out.seek(0)
    err.seek(0)
    return {"returncode": code, "stdout": out.read(), "stderr": err.read()}


def main() -> None:
  replies = os.fdopen(os.dup(1), "w")  # fd 1 itself is each command's stdout
  home = os.getcwd()
  for line in sys.stdin:
    request = json.loads(line)
    reply = run_one(request["module"], request["args"], request["cwd"])
    os.chdir(home)
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


if __name__ == "__main__":
  main()
