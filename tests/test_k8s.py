"""Plain manifests for GitOps and the kind e2e, built with the real kubectl (kustomize) and
validated against Kubernetes schemas."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_chart import HELM, KUBERNETES_VERSIONS

KUBECTL = os.environ.get("KUBECTL") or str(REPO / ".tools" / "bin" / "kubectl")
OVERLAYS = ["argocd", "flux"]


def kustomize(path: Path) -> list[dict]:
    if not Path(KUBECTL).exists():
        pytest.fail(f"kubectl not found at {KUBECTL}: run `make tools` (make test does)")
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_base_is_the_chart_rendered_from_k8s_values():
    rendered = subprocess.run([HELM, "template", "qlora-job", str(REPO / "helm" / "qlora-job"), "-f", str(REPO / "k8s" / "values.yaml")],
                              capture_output=True, text=True, check=True).stdout
    committed = (REPO / "k8s" / "base" / "qlora-job.yaml").read_text()
    assert committed.split("\n", 1)[1] == rendered, "regenerate: make k8s-manifests"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_build_valid_manifests_with_a_per_run_job_name(overlay, version):
    import kubernetes_validate

    docs = kustomize(REPO / "k8s" / "overlays" / overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    job = next(d for d in docs if d["kind"] == "Job")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert job["metadata"]["name"] == "qlora-job-2026-11-28" and job["metadata"]["namespace"] == "ml"
    # The ServiceAccount keeps the name its IRSA trust policy / workload identity binding is keyed on.
    assert sa["metadata"]["name"] == "qlora-job" == job["spec"]["template"]["spec"]["serviceAccountName"]
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    # Nothing replaces a Job in place (Replace=true cannot: argo-cd#9163), and no TTL deletes a finished
    # run for the GitOps controller to create again (argo-cd#8586).
    annotations = job["metadata"].get("annotations", {})
    assert "Replace=true" not in annotations.get("argocd.argoproj.io/sync-options", "")
    assert "ttlSecondsAfterFinished" not in job["spec"]
    # Renaming the Job for the next run never prunes one that is still training (issue 33).
    assert {"argocd": ("argocd.argoproj.io/sync-options", "Prune=false"),
            "flux": ("kustomize.toolkit.fluxcd.io/prune", "disabled")}[overlay] in annotations.items()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kind_minio_manifest_is_valid_and_restricted(version):
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((REPO / "k8s" / "kind" / "minio.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_kind_e2e_values_point_at_the_in_cluster_minio():
    values = yaml.safe_load((REPO / "helm" / "qlora-job" / "ci" / "cpu-kind-values.yaml").read_text())
    minio = [d for d in yaml.safe_load_all((REPO / "k8s" / "kind" / "minio.yaml").read_text()) if d]
    secret = next(d for d in minio if d["kind"] == "Secret")
    service = next(d for d in minio if d["kind"] == "Service")
    assert values["aws"]["existingSecret"] == secret["metadata"]["name"]
    assert values["aws"]["endpointUrl"] == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:9000"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert values["image"]["pullPolicy"] == "Never"  # the image comes from `kind load`, not a registry
    script = (REPO / "k8s" / "kind" / "e2e.sh").read_text()
    assert "ci/cpu-kind-values.yaml" in script and "kind load docker-image" in script
    assert subprocess.run(["bash", "-n", str(REPO / "k8s" / "kind" / "e2e.sh")]).returncode == 0


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubeflow_trainjob_runs_the_job_under_tini_with_shm_a_service_account_and_restricted_pss(version, clean_env):
    """The Trainer CRDs are not in the core schemas: the pod the runtime makes (its node template with the
    TrainJob's image, env and resources) is checked as a Pod, and every QLORA_* name against the job's settings."""
    import kubernetes_validate

    from job.settings import env_names
    from tests.test_chart import assert_restricted

    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "k8s" / "kubeflow" / "trainjob.yaml").read_text()) if d}
    account, runtime, job = docs["ServiceAccount"], docs["TrainingRuntime"], docs["TrainJob"]
    assert (job["apiVersion"], runtime["apiVersion"]) == ("trainer.kubeflow.org/v1alpha1",) * 2
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": runtime["metadata"]["name"]}
    trainer = job["spec"]["trainer"]
    assert "command" not in trainer, "a TrainJob command replaces the runtime's tini entry point"
    assert trainer["numNodes"] >= 2 and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"]
    node = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node")
    spec = node["template"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["name"] == "node" and container["command"][:2] == ["/usr/bin/tini", "--"]
    assert spec["serviceAccountName"] == account["metadata"]["name"] and account["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert_restricted(spec)
    pod_spec = {**spec, "containers": [{**container, "image": trainer["image"], "env": container["env"] + trainer["env"],
                                        "resources": trainer["resourcesPerNode"]}]}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node"}, "spec": pod_spec}, version, strict=True)
    kubernetes_validate.validate(account, version, strict=True)
    names = {e["name"] for e in pod_spec["containers"][0]["env"]}
    assert names <= set(env_names()), names - set(env_names())
    assert {"QLORA_DATASET_URI", "QLORA_OUTPUT_URI", "QLORA_RUN_ID", "QLORA_REQUIRE_GPU"} <= names


# Kubeflow Trainer v2.3's API (trainer.kubeflow.org/v1alpha1) and the JobSet v1alpha2 spec it embeds, written from
# their published Go types: the fields each object takes. TorchMLPolicySource is empty since v2.2 (kubeflow/trainer#3239
# removed numProcPerNode); a JobSet's Job template is a batch/v1 JobTemplateSpec, checked against Kubernetes' schema.
TRAINER_V2_3 = {
    "TrainJob": {"apiVersion", "kind", "metadata", "spec"},
    "TrainJobSpec": {"runtimeRef", "initializer", "trainer", "runtimePatches", "suspend", "activeDeadlineSeconds", "managedBy"},
    "RuntimeRef": {"name", "apiGroup", "kind"},
    "Trainer": {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"},
    "TrainingRuntime": {"apiVersion", "kind", "metadata", "spec"},
    "TrainingRuntimeSpec": {"mlPolicy", "podGroupPolicy", "template"},
    "MLPolicy": {"numNodes", "torch", "mpi", "flux", "jax", "xgboost"},
    "TorchMLPolicySource": set(),
    "JobSetTemplateSpec": {"metadata", "spec"},
    "JobSetSpec": {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend", "coordinator",
                   "managedBy", "ttlSecondsAfterFinished"},
    "FailurePolicy": {"maxRestarts", "restartStrategy", "rules"},
    "FailurePolicyRule": {"name", "action", "onJobFailureReasons", "onJobFailureMessagePatterns", "targetReplicatedJobs"},
    "ReplicatedJob": {"name", "groupName", "template", "replicas", "dependsOn"},
}


def unknown_trainer_fields(runtime: dict, job: dict) -> list[str]:
    """Every field of the two objects that Trainer v2.3 does not define (what a strict apply refuses), by path."""
    found = []

    def check(obj: dict, kind: str, path: str) -> None:
        found.extend(f"{path}.{key}" for key in obj if key not in TRAINER_V2_3[kind])

    check(job, "TrainJob", "TrainJob")
    check(job["spec"], "TrainJobSpec", "TrainJob.spec")
    check(job["spec"]["runtimeRef"], "RuntimeRef", "TrainJob.spec.runtimeRef")
    check(job["spec"].get("trainer", {}), "Trainer", "TrainJob.spec.trainer")
    spec = runtime["spec"]
    check(runtime, "TrainingRuntime", "TrainingRuntime")
    check(spec, "TrainingRuntimeSpec", "TrainingRuntime.spec")
    check(spec.get("mlPolicy", {}), "MLPolicy", "spec.mlPolicy")
    check(spec.get("mlPolicy", {}).get("torch") or {}, "TorchMLPolicySource", "spec.mlPolicy.torch")
    check(spec["template"], "JobSetTemplateSpec", "spec.template")
    check(spec["template"]["spec"], "JobSetSpec", "spec.template.spec")
    failure = spec["template"]["spec"].get("failurePolicy", {})
    check(failure, "FailurePolicy", "failurePolicy")
    for rule in failure.get("rules", []):
        check(rule, "FailurePolicyRule", "failurePolicy.rules[]")
    for replicated in spec["template"]["spec"]["replicatedJobs"]:
        check(replicated, "ReplicatedJob", f"replicatedJobs[{replicated['name']}]")
    return found


def test_the_trainer_example_is_the_v2_3_api_and_its_runtime_keeps_the_exit_code_contract(clean_env):
    """A strict apply against Trainer v2.2/v2.3 CRDs refused torch.numProcPerNode; JobSet's defaults (restartPolicy
    OnFailure, backoffLimit 6) restarted exit codes 2, 3 and 5 in place while the other node waited."""
    import json

    import kubernetes_validate

    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "k8s" / "kubeflow" / "trainjob.yaml").read_text()) if d}
    runtime, job = docs["TrainingRuntime"], docs["TrainJob"]
    assert unknown_trainer_fields(runtime, job) == []
    old = json.loads(json.dumps(runtime))
    old["spec"]["mlPolicy"]["torch"] = {"numProcPerNode": "auto"}
    assert unknown_trainer_fields(old, job) == ["spec.mlPolicy.torch.numProcPerNode"], "the check finds what v2.3 removed"
    jobset = runtime["spec"]["template"]["spec"]
    node = next(r for r in jobset["replicatedJobs"] if r["name"] == "node")
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node"}, "spec": node["template"]["spec"]},
                                 KUBERNETES_VERSIONS[-1], strict=True)
    template = node["template"]["spec"]
    assert template["template"]["spec"]["restartPolicy"] == "Never" and template["backoffLimit"] == 0
    assert template["podReplacementPolicy"] == "Failed"
    codes = json.loads((REPO / "helm" / "qlora-job" / "files" / "exit-codes.json").read_text())
    fail, ignore = template["podFailurePolicy"]["rules"]
    assert fail["action"] == "FailJob" and fail["onExitCodes"]["containerName"] == "node"
    assert sorted(fail["onExitCodes"]["values"]) == sorted(int(c) for c, info in codes.items() if not info["retry"] and c != "0")
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # A node Job failed by that policy fails the JobSet; any other failure restarts all nodes together.
    rule = jobset["failurePolicy"]["rules"][0]
    assert (rule["action"], rule["onJobFailureReasons"]) == ("FailJobSet", ["PodFailurePolicy"])
    assert jobset["failurePolicy"]["maxRestarts"] >= 1


def _wait():
    import importlib.util

    spec = importlib.util.spec_from_file_location("e2e_wait", REPO / "k8s" / "kind" / "e2e_wait.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kind_e2e_stops_waiting_on_failed_as_on_complete():
    """Job statuses as the API server writes them (batch/v1, Kubernetes 1.31+ adds the *Target conditions first)."""
    outcome = _wait().job_outcome
    running = {"status": {"active": 1, "startTime": "2026-12-02T10:00:00Z"}}
    failing = {"status": {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"}]}}
    failed = {"status": {"conditions": [
        {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"},
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
         "message": "Container qlora-job for pod ml/run-1-abc failed with exit code 3 matching FailJob rule at index 0"}]}}
    complete = {"status": {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}}
    assert outcome(running) is None and outcome(failing) is None
    assert outcome(failed) == ("Failed", "PodFailurePolicy: Container qlora-job for pod ml/run-1-abc failed with exit code 3 "
                                         "matching FailJob rule at index 0")
    assert outcome(complete)[0] == "Complete"


def test_kind_e2e_waits_for_the_port_forward_to_accept_and_uses_the_fetched_tools():
    import socket

    wait_port = _wait().wait_port
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert wait_port("127.0.0.1", server.getsockname()[1], 5) == 0
        port = server.getsockname()[1]
    assert wait_port("127.0.0.1", port, 0.5) == 1  # closed: gives up after its timeout
    script = (REPO / "k8s" / "kind" / "e2e.sh").read_text()
    assert "KUBECTL=${KUBECTL:-.tools/bin/kubectl}" in script and "HELM=${HELM:-.tools/bin/helm}" in script
    assert "e2e_wait.py port" in script and "e2e_wait.py job" in script and "sleep" not in script
    assert 'KEEP_CLUSTER:-0}" = 1' in script and "condition=complete" not in script
