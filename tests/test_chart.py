"""The Helm chart, rendered by the real helm binary and validated against real Kubernetes schemas."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from job.errors import EXIT_CODES, ExitCode
from job.settings import env_names
from tests.conftest import REPO, run_job

CHART = REPO / "helm" / "qlora-job"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBERNETES_VERSIONS = ("1.29", "1.33")
HELM = os.environ.get("HELM") or str(REPO / ".tools" / "bin" / "helm")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not Path(HELM).exists():
        pytest.fail(f"helm not found at {HELM}: run `make tools` (make test does)")
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def render(*args: str) -> list[dict]:
    out = helm("template", "run-1", str(CHART), "--namespace", "ml", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def pod_spec(docs: list[dict]) -> dict:
    """The run's pod (a Job's or a CronJob's), not a hook's."""
    for doc in docs:
        if doc["kind"] == "Job" and "helm.sh/hook" not in doc["metadata"].get("annotations", {}):
            return doc["spec"]["template"]["spec"]
        if doc["kind"] == "CronJob":
            return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    raise AssertionError("no Job or CronJob rendered")


def job_spec(docs: list[dict]) -> dict:
    for doc in docs:
        if doc["kind"] == "Job":
            return doc["spec"]
        if doc["kind"] == "CronJob":
            return doc["spec"]["jobTemplate"]["spec"]
    raise AssertionError("no Job or CronJob rendered")


@pytest.mark.parametrize("values", CI_VALUES, ids=[v.stem for v in CI_VALUES])
def test_lint_strict(values):
    helm("lint", "--strict", str(CHART), "-f", str(values))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", CI_VALUES, ids=[v.stem for v in CI_VALUES])
def test_rendered_manifests_are_valid_kubernetes(values, version):
    import kubernetes_validate

    docs = render("-f", str(values), "--kube-version", version)
    assert {d["kind"] for d in docs} >= {"ServiceAccount"} and len(docs) >= 2
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_job_by_default_cronjob_with_a_schedule():
    assert [d["kind"] for d in render("-f", str(CHART / "ci" / "minimal-values.yaml"))] == ["ServiceAccount", "Job"]
    cron = next(d for d in render("-f", str(CHART / "ci" / "cronjob-values.yaml")) if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["schedule"] == "0 3 * * 1"
    assert cron["spec"]["timeZone"] == "Asia/Seoul" and cron["spec"]["startingDeadlineSeconds"] > 0
    assert cron["spec"]["successfulJobsHistoryLimit"] == 3


def test_pod_failure_policy_codes_are_the_exit_code_table():
    generated = json.loads(run_job("exit-codes", env={}).stdout)
    assert json.loads((CHART / "files" / "exit-codes.json").read_text()) == generated, "regenerate: make chart-files"
    rules = job_spec(render("-f", str(CHART / "ci" / "minimal-values.yaml")))["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")["onExitCodes"]
    no_retry = {int(code) for code, (retry, _) in EXIT_CODES.items() if not retry and code != ExitCode.OK}
    assert set(fail["values"]) == no_retry == {2, 3, 4, 5, 6, 7, 8, 11, 12}
    assert fail["containerName"] == "qlora-job"
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


def assert_restricted(spec: dict) -> None:
    """The restricted Pod Security Standard, and the mounts a read-only root filesystem needs."""
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in v for v in spec.get("volumes", []))
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["readOnlyRootFilesystem"] is True
        assert not any(p.get("hostPort") for p in container.get("ports", []))
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/dev/shm"} <= set(mounts)
    assert all(m.get("readOnly") for path, m in mounts.items() if path not in ("/tmp", "/dev/shm")), "extra mounts are read-only"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("values", CI_VALUES, ids=[v.stem for v in CI_VALUES])
def test_pod_meets_the_restricted_pod_security_standard(values):
    spec = pod_spec(render("-f", str(values)))
    assert_restricted(spec)
    assert spec["restartPolicy"] == "Never"


@pytest.mark.parametrize("values", CI_VALUES, ids=[v.stem for v in CI_VALUES])
def test_every_variable_the_chart_sets_is_accepted_by_the_job(values):
    known = env_names()
    env = pod_spec(render("-f", str(values)))["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), "duplicate variables"
    qlora = [n for n in names if n.startswith("QLORA_")]
    assert qlora and all(n in known for n in qlora), [n for n in qlora if n not in known]


def test_no_secret_value_in_rendered_manifests():
    docs = render("-f", str(CHART / "ci" / "secret-credentials-values.yaml"))
    env = {e["name"]: e for e in pod_spec(docs)["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "qlora-s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["QLORA_HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"] and "value" not in env["QLORA_HF_TOKEN"]
    assert pod_spec(docs)["containers"][0]["image"].endswith("@sha256:" + "0123456789abcdef" * 4)


def test_workload_identity_and_scheduling_values_reach_the_pod():
    docs = render("-f", str(CHART / "ci" / "irsa-values.yaml"))
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/qlora-job")
    assert sa["automountServiceAccountToken"] is False
    spec = pod_spec(docs)
    assert spec["serviceAccountName"] == sa["metadata"]["name"] and spec["priorityClassName"] == "batch-low"
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training"
    run_id = next(e for e in spec["containers"][0]["env"] if e["name"] == "QLORA_RUN_ID")
    assert run_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"


def test_cpu_values_request_no_gpu():
    spec = pod_spec(render("-f", str(CHART / "ci" / "cpu-kind-values.yaml")))
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"].get("limits", {})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "datasetUrl=s3://a/b"], "additional properties 'datasetUrl' not allowed"),
        (["--set", "serviceAccount.anotations.x=y"], "additional properties 'anotations' not allowed"),
        (["--set", "maxSteps=many"], "maxSteps"),
        (["--set", "gpus=-1"], "gpus"),
        (["--set", "engine=vllm"], "engine"),
        (["--set", "datasetUri=gs://bucket/x.jsonl"], "datasetUri"),
        (["--set", "settings.LORA_R=8"], "LORA_R"),
        (["--set", "image.digest=latest"], "digest"),
        ([], "datasetUri is required"),
    ],
)
def test_bad_values_are_refused(args, message):
    base = [] if not args else ["--set", "datasetUri=s3://a-bucket/x.jsonl", "--set", "outputUri=s3://a-bucket/out"]
    result = helm("template", "run-1", str(CHART), *base, *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_readme_example_values_file_installs_a_run():
    readme = (CHART / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert len(example.strip().splitlines()) <= 12
    values = REPO / ".work" / "readme-values.yaml"
    values.parent.mkdir(exist_ok=True)
    values.write_text(example)
    docs = render("-f", str(values))
    env = {e["name"]: e.get("value") for e in pod_spec(docs)["containers"][0]["env"]}
    assert env["QLORA_DATASET_URI"].startswith("s3://") and env["QLORA_LORA__R"] == "8"


def test_chart_readme_values_table_is_current():
    import sys

    result = subprocess.run([sys.executable, str(REPO / "helm" / "chart_docs.py"), "--check"])
    assert result.returncode == 0, "regenerate: make chart-files"


# Defects a real cluster shows (issue 16): each test below failed before its fix.
MINIMAL = ("--set", "datasetUri=s3://a-bucket/x.jsonl", "--set", "outputUri=s3://a-bucket/out")


def _env(docs: list[dict]) -> list[dict]:
    return pod_spec(docs)["containers"][0]["env"]


def test_the_plan_hook_runs_before_the_gpu_job_on_a_cpu_node_with_the_runs_settings_and_account():
    docs = render("-f", str(CHART / "ci" / "preflight-values.yaml"), "--set", "gpus=1", "--set", "settings.QLORA_TRAIN__EPOCHS=2")
    hook = next(d for d in docs if d["kind"] == "Job" and "helm.sh/hook" in d["metadata"].get("annotations", {}))
    annotations = hook["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec, run = hook["spec"]["template"]["spec"], pod_spec(docs)
    container = spec["containers"][0]
    assert container["args"] == ["plan"] and hook["spec"]["backoffLimit"] == 0
    assert "nvidia.com/gpu" not in json.dumps(container["resources"]) and spec["nodeSelector"] == {"node-pool": "cpu"}
    assert not spec.get("tolerations"), "the GPU taint toleration is the run's, not the plan's"
    plan_env = [e for e in container["env"] if e["name"] != "NVIDIA_VISIBLE_DEVICES"]
    assert plan_env == [e for e in run["containers"][0]["env"] if e["name"] != "QLORA_REQUIRE_GPU"], "the plan sees the run's settings"
    assert spec["serviceAccountName"] == run["serviceAccountName"]
    assert_restricted(spec)
    # The account exists before the hook: it is a hook itself, created first.
    account = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["annotations"]
    assert (account["helm.sh/hook"], int(account["helm.sh/hook-weight"])) == ("pre-install,pre-upgrade", -10)
    assert account["eks.amazonaws.com/role-arn"].endswith(":role/qlora-job")
    # Off (the default), neither exists.
    assert not any("helm.sh/hook" in json.dumps(d) for d in render(*MINIMAL))


def test_kueue_reads_the_queue_from_the_job_and_the_cronjobs_job_template():
    """Kueue admits a Job by the queue-name label on the Job itself; on the pod template it is ignored."""
    job = next(d for d in render(*MINIMAL, "--set", "kueue.queueName=gpu") if d["kind"] == "Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    cron = next(d for d in render(*MINIMAL, "--set", "kueue.queueName=gpu", "--set", "schedule=0 3 * * 1") if d["kind"] == "CronJob")
    assert cron["spec"]["jobTemplate"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert "kueue.x-k8s.io/queue-name" not in cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]


def test_the_chart_renders_as_a_subchart_with_global_values(tmp_path):
    import shutil

    umbrella = tmp_path / "platform"
    shutil.copytree(CHART, umbrella / "charts" / "qlora-job")
    (umbrella / "Chart.yaml").write_text("apiVersion: v2\nname: platform\nversion: 1.0.0\n")
    (umbrella / "values.yaml").write_text("global:\n  imageRegistry: registry.example\nqlora-job:\n"
                                          "  datasetUri: s3://a-bucket/x.jsonl\n  outputUri: s3://a-bucket/out\n")
    docs = [d for d in yaml.safe_load_all(helm("template", "p", str(umbrella)).stdout) if d]
    assert any(d["kind"] == "Job" for d in docs)


def test_run_length_in_epochs_reaches_the_job_and_defaults_to_the_jobs_own(tmp_path, clean_env, monkeypatch):
    from job.settings import Settings

    names = {e["name"] for e in _env(render(*MINIMAL))}
    assert not names & {"QLORA_TRAIN__EPOCHS", "QLORA_TRAIN__MAX_STEPS"}, "unset: the job sizes the run (fast: 3 epochs)"
    values = tmp_path / "values.yaml"
    values.write_text("datasetUri: s3://a-bucket/x.jsonl\noutputUri: s3://a-bucket/out\nepochs: 1.5\nmaxSteps: 400\n")
    env = {e["name"]: e.get("value") for e in _env(render("-f", str(values)))}
    assert (env["QLORA_TRAIN__EPOCHS"], env["QLORA_TRAIN__MAX_STEPS"]) == ("1.5", "400")
    for name in ("QLORA_DATASET_URI", "QLORA_OUTPUT_URI", "QLORA_TRAIN__EPOCHS", "QLORA_TRAIN__MAX_STEPS"):
        monkeypatch.setenv(name, env[name])
    assert (Settings().train.epochs, Settings().train.max_steps) == (1.5, 400)


def test_numbers_from_a_values_file_reach_the_job_exactly(tmp_path, clean_env, monkeypatch):
    """YAML numbers arrive as float64: 2000000 rendered as 2e+06 and the settings loader refused it (exit 2)."""
    from job.settings import Settings

    values = tmp_path / "values.yaml"
    values.write_text("datasetUri: s3://a-bucket/x.jsonl\noutputUri: s3://a-bucket/out\nmaxSteps: 2000000\n"
                      "settings:\n  QLORA_CHECKPOINT__EVERY_STEPS: 1000000\n  QLORA_TRAIN__LEARNING_RATE: 2.0e-4\n"
                      '  QLORA_LORA__TARGET_MODULES: ["q_proj", "v_proj"]\n')
    env = {e["name"]: e.get("value") for e in _env(render("-f", str(values)))}
    assert (env["QLORA_TRAIN__MAX_STEPS"], env["QLORA_CHECKPOINT__EVERY_STEPS"]) == ("2000000", "1000000")
    assert env["QLORA_TRAIN__LEARNING_RATE"] == "0.0002" and env["QLORA_LORA__TARGET_MODULES"] == '["q_proj","v_proj"]'
    for name, value in env.items():
        if name.startswith("QLORA_") and value is not None:
            monkeypatch.setenv(name, value)
    settings = Settings()  # as the job reads its environment
    assert settings.train.max_steps == 2_000_000 and settings.lora.target_modules == ["q_proj", "v_proj"]


def test_a_dataset_list_in_values_reaches_the_job_as_its_json(tmp_path, clean_env, monkeypatch):
    from job.settings import Settings, dataset_sources

    values = tmp_path / "values.yaml"
    values.write_text("outputUri: s3://a-bucket/out\ndatasetUri:\n  - s3://a-bucket/shards/\n"
                      "  - {uri: s3://a-bucket/handbook.jsonl.zst, weight: 3}\n")
    env = {e["name"]: e.get("value") for e in _env(render("-f", str(values)))}
    monkeypatch.setenv("QLORA_DATASET_URI", env["QLORA_DATASET_URI"])
    monkeypatch.setenv("QLORA_OUTPUT_URI", env["QLORA_OUTPUT_URI"])
    assert dataset_sources(Settings().dataset_uri) == [("s3://a-bucket/shards/", 1.0), ("s3://a-bucket/handbook.jsonl.zst", 3.0)]
    # The schema refuses what the job would refuse, before anything reaches the cluster.
    for bad in ("[{uri: s3://a-bucket/x.jsonl, weight: 0}]", "[]", "[{uri: gs://a-bucket/x.jsonl}]"):
        values.write_text(f"outputUri: s3://a-bucket/out\ndatasetUri: {bad}\n")
        result = helm("template", "run-1", str(CHART), "-f", str(values), check=False)
        assert result.returncode != 0 and "datasetUri" in result.stderr, (bad, result.stderr)


def test_a_variable_the_user_repeats_appears_once_with_the_users_value():
    """Server-side apply (Helm 4's default) refuses a container env list with a repeated name."""
    docs = render(*MINIMAL, "--set", "maxSteps=60", "--set", "settings.QLORA_TRAIN__MAX_STEPS=500",
                  "--set-json", 'env=[{"name": "QLORA_ENGINE", "value": "transformers"}, {"name": "QLORA_LORA__R", "value": "4"}]',
                  "--set", "settings.QLORA_LORA__R=8")
    env = _env(docs)
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), names
    values = {e["name"]: e.get("value") for e in env}
    assert values["QLORA_TRAIN__MAX_STEPS"] == "500" and values["QLORA_ENGINE"] == "transformers" and values["QLORA_LORA__R"] == "4"
    assert names.index("QLORA_TRAIN__MAX_STEPS") < names.index("QLORA_RUN_ID"), "a repeated name keeps its first place"


def test_a_null_work_volume_size_is_an_empty_emptydir():
    import kubernetes_validate

    docs = render(*MINIMAL, "--set", "workVolume.sizeLimit=null")
    tmp = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "tmp")
    assert tmp == {"name": "tmp", "emptyDir": {}}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_pod_requests_node_disk_for_its_work_volume():
    requests = pod_spec(render(*MINIMAL))["containers"][0]["resources"]["requests"]
    assert requests["ephemeral-storage"] == "50Gi"


def test_a_gpu_pod_is_told_to_refuse_cpu_training_and_a_cpu_pod_is_not():
    assert {"name": "QLORA_REQUIRE_GPU", "value": "true"} in _env(render(*MINIMAL))
    assert "QLORA_REQUIRE_GPU" not in {e["name"] for e in _env(render("-f", str(CHART / "ci" / "cpu-kind-values.yaml")))}


def test_notes_and_readme_give_the_whole_exit_code_table():
    notes = helm("install", "--dry-run=client", "run-1", str(CHART), *MINIMAL).stdout.split("NOTES:", 1)[1]
    fail = sorted(int(c) for c, (retry, _) in EXIT_CODES.items() if not retry and c != ExitCode.OK)
    retried = sorted(int(c) for c, (retry, _) in EXIT_CODES.items() if retry)
    assert f"Exit codes {','.join(map(str, fail))} fail the Job at once" in notes
    assert f"{','.join(map(str, retried))} are retried, up to backoffLimit=3" in notes
    rows = {}
    for line in (REPO / "README.md").read_text().split("## Exit codes", 1)[1].split("\n\n")[1].splitlines()[2:]:
        code, _, retry = (cell.strip() for cell in line.strip("|").split("|"))
        rows[int(code)] = retry
    assert set(rows) == {int(c) for c in EXIT_CODES}
    for code, (retry, _) in EXIT_CODES.items():
        if int(code):
            assert rows[int(code)].startswith("yes" if retry else "no"), (code, rows[int(code)])


# Cluster details a platform team hits next (issue 33): each test below fails on the chart before it.
def _hook(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Job" and "helm.sh/hook" in d["metadata"].get("annotations", {}))


def test_the_hook_fits_helms_default_timeout_and_takes_the_runs_pod_settings():
    """Helm waits --timeout (5m) for a hook Job; the plan pod gets the run pod's pod-level settings."""
    assert _hook(render("-f", str(CHART / "ci" / "preflight-values.yaml")))["spec"]["activeDeadlineSeconds"] < 300
    assert "--timeout 31m" in (CHART / "README.md").read_text() and "activeDeadlineSeconds=1800" in (CHART / "README.md").read_text()
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "team", "operator": "In", "values": ["ml"]}]}]}}}
    docs = render("-f", str(CHART / "ci" / "preflight-values.yaml"), "--set", "podAnnotations.example\\.com/owner=ml",
                  "--set", "podLabels.team=ml", "--set", "priorityClassName=batch-low", "--set", "runtimeClassName=nvidia",
                  "--set-json", f"affinity={json.dumps(affinity)}")
    hook, run = _hook(docs)["spec"]["template"], next(d for d in docs if d["kind"] == "Job" and d is not _hook(docs))
    spec = hook["spec"]
    assert hook["metadata"]["annotations"]["example.com/owner"] == "ml" and hook["metadata"]["labels"]["team"] == "ml"
    assert (spec["priorityClassName"], spec["runtimeClassName"], spec["affinity"]) == ("batch-low", "nvidia", affinity)
    # Mesh sidecars never hold a Job open; only the training pod asks autoscalers to leave it be.
    assert hook["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert "karpenter.sh/do-not-disrupt" not in hook["metadata"]["annotations"]
    assert run["spec"]["template"]["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    # Own values win: no affinity and the default runtime for a CPU plan beside a GPU run.
    spec = _hook(render("-f", str(CHART / "ci" / "preflight-values.yaml"), "--set", "runtimeClassName=nvidia",
                        "--set-json", f"affinity={json.dumps(affinity)}", "--set-json", "preflight.affinity={}",
                        "--set", "preflight.runtimeClassName="))["spec"]["template"]["spec"]
    assert "affinity" not in spec and "runtimeClassName" not in spec


@pytest.mark.parametrize("args", [(), ("--set", "podFailurePolicy.enabled=false"), ("--set", "schedule=0 3 * * 1")])
def test_a_replacement_pod_never_starts_while_the_old_one_checkpoints(args):
    """Without it, podFailurePolicy off means TerminatingOrFailed: a second GPU pod during the 300 s grace."""
    docs = render(*MINIMAL, "--set", "preflight.enabled=true", *args)
    assert job_spec(docs)["podReplacementPolicy"] == "Failed"
    assert _hook(docs)["spec"]["podReplacementPolicy"] == "Failed"


def test_the_training_pod_asks_autoscalers_not_to_consolidate_it_and_the_user_can_say_otherwise():
    annotations = job_spec(render(*MINIMAL))["template"]["metadata"]["annotations"]
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    own = job_spec(render(*MINIMAL, "--set-string", "podAnnotations.karpenter\\.sh/do-not-disrupt=false"))["template"]["metadata"]["annotations"]
    assert own["karpenter.sh/do-not-disrupt"] == "false"
    off = job_spec(render(*MINIMAL, "--set", "disruption.protect=false", "--set", "disableSidecarInjection=false"))["template"]
    assert "annotations" not in off["metadata"]
    values = (CHART / "values.yaml").read_text()
    assert "node-pressure evictions" in values and "DisruptionTarget" in values


@pytest.mark.parametrize(("args", "limits"), [
    ((), {"nvidia.com/gpu": 1}),
    (("--set", "gpuResourceName=nvidia.com/mig-3g.40gb"), {"nvidia.com/mig-3g.40gb": 1}),
    (("--set", "resources.limits.nvidia\\.com/mig-1g\\.10gb=1"), {"nvidia.com/mig-1g.10gb": 1}),
    (("--set", "gpus=1", "--set", "resources.limits.nvidia\\.com/gpu=2"), {"nvidia.com/gpu": 2}),
])
def test_a_gpu_limit_never_stacks_with_the_users_own(args, limits):
    container = pod_spec(render(*MINIMAL, *args))["containers"][0]
    assert {k: v for k, v in container["resources"]["limits"].items() if k.startswith("nvidia.com/")} == limits
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QLORA_REQUIRE_GPU"] == "true" and "NVIDIA_VISIBLE_DEVICES" not in env


def test_pods_that_ask_for_no_gpu_see_none():
    """The image bakes NVIDIA_VISIBLE_DEVICES=all: a runtime that honours it would hand every GPU to a CPU pod."""
    docs = render(*MINIMAL, "--set", "gpus=0", "--set", "preflight.enabled=true")
    for container in (pod_spec(docs)["containers"][0], _hook(docs)["spec"]["template"]["spec"]["containers"][0]):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and "QLORA_REQUIRE_GPU" not in env
    hook = _hook(render(*MINIMAL, "--set", "preflight.enabled=true"))["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in hook["env"], "the plan hook never has a GPU"


@pytest.mark.parametrize("schedule", [(), ("--set", "schedule=0 3 * * 1")])
def test_extension_points_reach_the_job_and_the_pods(schedule):
    docs = render("-f", str(CHART / "ci" / "extensions-values.yaml"), *schedule)
    job = next(d for d in docs if d["kind"] in ("Job", "CronJob") and "helm.sh/hook" not in d["metadata"].get("annotations", {}))
    meta = job["spec"]["jobTemplate"]["metadata"] if job["kind"] == "CronJob" else job["metadata"]
    assert meta["labels"]["kueue.x-k8s.io/priority-class"] == "batch-low" and meta["labels"]["kueue.x-k8s.io/max-exec-time-seconds"] == "21600"
    assert meta["annotations"]["team.example.com/cost-center"] == "ml-platform"
    pod = pod_spec(docs)
    assert "kueue.x-k8s.io/priority-class" not in job_spec(docs)["template"]["metadata"]["labels"], "Kueue reads the Job's"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    hook = _hook(docs)["spec"]["template"]["spec"]
    for spec in (pod, hook):  # the CA bundle reaches S3 calls in the plan as in the run
        container = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "ca-bundle")
        assert env["AWS_CA_BUNDLE"].startswith(mount["mountPath"] + "/")
        assert next(v for v in spec["volumes"] if v["name"] == "ca-bundle")["configMap"]["name"] == "internal-ca"
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "48Gi", "nvidia.com/mig-3g.40gb": 1}


@pytest.mark.parametrize(("env", "message"), [
    ('[{"name": "X", "value": 1}]', "value"),
    ('[{"value": "x"}]', "name"),
    ('[{"name": "X", "value": "a", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]', "env"),
    ('[{"name": "X", "vaule": "a"}]', "vaule"),
])
def test_env_items_are_checked_by_the_schema(env, message):
    """`--set env[0].value=1` rendered a number the API rejects; a nameless entry crashed the template."""
    result = helm("template", "run-1", str(CHART), *MINIMAL, "--set-json", f"env={env}", check=False)
    assert result.returncode != 0 and "values don't meet the specifications" in result.stderr and message in result.stderr, result.stderr


def test_notes_name_jobs_kubernetes_accepts_and_wait_ends_on_failure():
    long = "support-bot-nightly-retraining-for-korean-helpdesk-26"  # 53: the longest release name Helm takes
    assert len(long) == 53
    for args in (("--set", "schedule=0 3 * * 1"), ()):
        notes = helm("install", "--dry-run=client", long, str(CHART), *MINIMAL, *args).stdout.split("NOTES:", 1)[1]
        for line in notes.splitlines():
            if "create job --from=cronjob/" in line:
                name = line.split()[-1].replace("$(date +%s)", "1767225600")
                assert len(name) <= 63, name
        if not args:
            assert "--for=condition=Failed" in notes and "--for=condition=Complete" in notes


def test_the_iam_example_lets_the_job_list_every_prefix_it_reads():
    """A dataset given as a prefix needs s3:ListBucket on its bucket (S3 answers 403 without it)."""
    readme = (CHART / "README.md").read_text()
    policy = json.loads(readme.split("## Least-privilege bucket access", 1)[1].split("```json\n", 1)[1].split("```", 1)[0])
    listed = {s["Resource"].split(":::")[1]: s["Condition"]["StringLike"]["s3:prefix"] for s in policy["Statement"]
              if s["Action"] == ["s3:ListBucket"]}
    for statement in policy["Statement"]:
        if statement["Action"] == ["s3:GetObject"]:
            for resource in statement["Resource"]:
                bucket, prefix = resource.split(":::")[1].split("/", 1)
                assert prefix in listed.get(bucket, []), (bucket, prefix, listed)


def test_openshift_runs_without_the_fixed_ids():
    """restricted-v2 assigns the uid from the namespace's range and rejects a fixed one: the override unsets them."""
    import kubernetes_validate

    docs = render(*MINIMAL, "--set", "podSecurityContext.runAsUser=null", "--set", "podSecurityContext.runAsGroup=null",
                  "--set", "podSecurityContext.fsGroup=null")
    context = pod_spec(docs)["securityContext"]
    assert context == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    assert "podSecurityContext.runAsUser=null" in (CHART / "README.md").read_text()
