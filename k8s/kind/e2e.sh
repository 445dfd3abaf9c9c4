#!/usr/bin/env bash
# `make kind-e2e`: the cpu image in a kind cluster with in-cluster MinIO, one `helm install`,
# then the published manifest checked object by object. Needs docker and kind; helm and kubectl are
# the ones `make tools` fetched. KEEP_CLUSTER=1 leaves the cluster up for debugging.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=qlora-e2e NS=qlora-e2e IMAGE=qlora-job:cpu-dev RELEASE=run-1 PORT=${E2E_PORT:-19000}
PYTHON=${PYTHON:-.venv/bin/python} HELM=${HELM:-.tools/bin/helm} KUBECTL=${KUBECTL:-.tools/bin/kubectl}
for tool in docker kind "$KUBECTL" "$HELM"; do command -v "$tool" >/dev/null || { echo "kind-e2e: $tool not found (make tools)" >&2; exit 2; }; done
kubectl() { "$KUBECTL" "$@"; }

kind create cluster --name "$CLUSTER" --config k8s/kind/cluster.yaml --wait 180s
cleanup() {
  [ -n "${PF:-}" ] && kill "$PF" 2>/dev/null
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then echo "kind-e2e: cluster $CLUSTER kept (kind delete cluster --name $CLUSTER)"; else kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT

docker build --target cpu ${BASE_IMAGE:+--build-arg BASE_IMAGE=$BASE_IMAGE} -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

kubectl apply -f k8s/kind/minio.yaml
kubectl -n "$NS" rollout status deploy/minio --timeout=300s
kubectl -n "$NS" port-forward svc/minio "$PORT:9000" >/dev/null & PF=$!
"$PYTHON" k8s/kind/e2e_wait.py port 127.0.0.1 "$PORT" 30
"$PYTHON" k8s/kind/e2e_s3.py seed "http://127.0.0.1:$PORT"

"$HELM" install "$RELEASE" helm/qlora-job -n "$NS" -f helm/qlora-job/ci/cpu-kind-values.yaml --wait=false
JOB="$RELEASE-qlora-job"
# Complete or Failed, whichever comes first: waiting only for Complete sits out the timeout on a failure.
if ! "$PYTHON" k8s/kind/e2e_wait.py job "$KUBECTL" "$NS" "$JOB" 1200; then
  kubectl -n "$NS" describe job "$JOB"; kubectl -n "$NS" logs "job/$JOB" --tail=50; exit 1
fi
"$PYTHON" k8s/kind/e2e_s3.py check "http://127.0.0.1:$PORT" "$JOB"
echo "kind-e2e: passed"
