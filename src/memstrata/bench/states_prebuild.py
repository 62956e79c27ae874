"""DeepSpeed's CPU Adam, JIT-built in the background while the other contenders of the state bench run.

[Note: the DeepSpeed build]
DeepSpeed ships no binary wheel: ``DeepSpeedCPUAdam`` (ZeRO-Offload's optimizer)
is compiled on first use by torch's cpp_extension (ninja, c++; two C++ files
against torch's headers: about a minute on a 16-core box, several on 2 cores)
and cached in ``TORCH_EXTENSIONS_DIR``.  Inside the ``deepspeed_zero_offload``
worker that minute would eat the run's timeout.  So `start_peer_builds` starts
``python -m memstrata.bench.states_prebuild --status FILE`` when the bench
begins (the contender runs last), and the worker waits for FILE
(`wait_for_build`): "ok" and it loads the cached library at once; "failed:
reason" or no answer within ``MEMSTRATA_DS_BUILD_WAIT`` seconds and the row says
"skipped: ..." with that reason, never a hang.  Without the environment
variables (a worker run by hand) the worker builds itself, as DeepSpeed does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

STATUS_ENV = "MEMSTRATA_DS_BUILD_STATUS"
WAIT_ENV = "MEMSTRATA_DS_BUILD_WAIT"
DS_ROW_SECONDS = 45.0  # what the DeepSpeed row needs after its build: start, initialize, 2-4 steps of ~3 s


def build_deepspeed_cpu_adam() -> None:
    """Compile (or load from the cache) DeepSpeed's CPU Adam for this accelerator."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)


def _write_status(path: str, status: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)  # the waiting worker sees the whole file or none


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--status", required=True, help="JSON file written when the build ends (ok or failed: reason)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        build_deepspeed_cpu_adam()
        status: dict[str, Any] = {"status": "ok", "reason": ""}
    except ImportError as e:  # deepspeed or one of its dependencies (hjson, msgpack, pydantic, ...)
        status = {"status": "failed", "reason": f"not installed: {type(e).__name__}: {e}"[:300]}
    except BaseException as e:  # noqa: BLE001 -- every failure becomes the row's reason
        text = str(e).strip().splitlines()
        status = {"status": "failed", "reason": f"{type(e).__name__}: {text[-1] if text else ''}"[:300]}
    status["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[states_prebuild] DeepSpeed CPU Adam: {status}", flush=True)
    _write_status(a.status, status)
    return 0 if status["status"] == "ok" else 1


class PeerBuilds:
    """The background build process, and the environment its waiting worker reads."""

    def __init__(self, proc: subprocess.Popen | None, status_path: str, wait_s: float) -> None:
        self.proc, self.status_path, self.wait_s = proc, status_path, wait_s
        self._old = {k: os.environ.get(k) for k in (STATUS_ENV, WAIT_ENV)}
        os.environ[STATUS_ENV] = status_path
        os.environ[WAIT_ENV] = f"{wait_s:g}"

    def stop(self) -> None:
        """End the build if it still runs (the bench is over); restore the environment."""
        if self.proc is not None and self.proc.poll() is None:
            try:  # its own session: the compilers ninja started go with it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
            self.proc.wait()
        for k, v in self._old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_peer_builds(contenders: list[str], device: str, workdir: str, run_timeout: float) -> PeerBuilds | None:
    """Start DeepSpeed's CPU Adam build in the background when its contender will run on CUDA (None: nothing
    to build: not asked for, not installed, or a CPU box, where DeepSpeed refuses before it builds)."""
    if "deepspeed_zero_offload" not in contenders or device != "cuda":
        return None
    if importlib.util.find_spec("deepspeed") is None:
        return None
    status = os.path.join(workdir, "deepspeed_build.status.json")
    if os.path.exists(status):
        os.remove(status)
    log = open(os.path.join(workdir, "deepspeed_build.log"), "w")
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "memstrata.bench.states_prebuild", "--status", status],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        log.close()
    return PeerBuilds(proc, status, max(0.0, run_timeout - DS_ROW_SECONDS))


def wait_for_build(poll_s: float = 0.5) -> str | None:
    """In the DeepSpeed worker: None when its CPU Adam is built (or no background build was started: then
    DeepSpeed builds it itself); otherwise why the contender must be skipped."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return None
    limit = float(os.environ.get(WAIT_ENV, "0") or 0)
    t0 = time.perf_counter()
    while not os.path.exists(path):
        if time.perf_counter() - t0 >= limit:
            return (f"DeepSpeed's CPU Adam (JIT build started when the bench began) not built after another "
                    f"{limit:.0f} s of waiting (raise --run-timeout)")
        time.sleep(poll_s)
    with open(path) as f:
        st = json.load(f)
    if st.get("status") != "ok":
        if str(st.get("reason", "")).startswith("not installed"):
            return str(st["reason"])
        return f"DeepSpeed's CPU Adam JIT build failed after {st.get('seconds')} s: {st.get('reason')}"
    return None


__all__ = ["PeerBuilds", "start_peer_builds", "wait_for_build", "build_deepspeed_cpu_adam", "main"]

if __name__ == "__main__":
    sys.exit(main())
