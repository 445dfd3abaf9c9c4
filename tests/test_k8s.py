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
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    if overlay == "argocd":
        assert job["metadata"]["annotations"]["argocd.argoproj.io/sync-options"] == "Replace=true"


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
def test_kubeflow_trainjob_example_uses_accepted_settings_and_valid_pod_fields(version, clean_env):
    """The TrainJob CRD is not in the core schemas: its trainer's env and resources are checked as
    the container fields they become, and every QLORA_* name against the job's own settings."""
    import kubernetes_validate

    from job.settings import env_names

    doc = yaml.safe_load((REPO / "k8s" / "kubeflow" / "trainjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    trainer = doc["spec"]["trainer"]
    assert trainer["command"] == ["python", "-m", "job"] and trainer["numNodes"] >= 2
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer"},
           "spec": {"containers": [{"name": "node", "image": trainer["image"], "command": trainer["command"],
                                    "env": trainer["env"], "resources": trainer["resourcesPerNode"]}]}}
    kubernetes_validate.validate(pod, version, strict=True)
    names = {e["name"] for e in trainer["env"]}
    assert names <= set(env_names()), names - set(env_names())
    assert {"QLORA_DATASET_URI", "QLORA_OUTPUT_URI", "QLORA_RUN_ID"} <= names
