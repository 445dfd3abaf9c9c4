"""Waits of `make kind-e2e`, which a shell loop gets wrong (cilium-cli#451):
    python k8s/kind/e2e_wait.py job KUBECTL NAMESPACE JOB SECONDS   exit 0 on Complete, 1 at once on Failed or timeout
    python k8s/kind/e2e_wait.py port HOST PORT SECONDS              exit 0 once a port-forward accepts connections"""

import json
import socket
import subprocess
import sys
import time


def job_outcome(job: dict) -> tuple[str, str] | None:
    """("Complete" | "Failed", reason: message) once a Job has finished, None while it runs."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"], f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return None


def wait_job(kubectl: str, namespace: str, name: str, seconds: float, poll: float = 5.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = subprocess.run([kubectl, "-n", namespace, "get", "job", name, "-o", "json"], capture_output=True, text=True)
        if got.returncode == 0 and (outcome := job_outcome(json.loads(got.stdout))):
            print(f"job/{name}: {outcome[0]} ({outcome[1]})", flush=True)
            return 0 if outcome[0] == "Complete" else 1
        time.sleep(poll)
    print(f"job/{name}: still running after {seconds:.0f} s", flush=True)
    return 1


def wait_port(host: str, port: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return 0
        except OSError:
            time.sleep(0.2)
    print(f"{host}:{port} accepted no connection within {seconds:.0f} s", flush=True)
    return 1


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    if what == "job":
        sys.exit(wait_job(args[0], args[1], args[2], float(args[3])))
    sys.exit(wait_port(args[0], int(args[1]), float(args[2])))
