{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "qlora-job.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name; a Job's pods get a 5-character suffix, so keep it to 52 characters. */}}
{{- define "qlora-job.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else if contains (include "qlora-job.name" .) .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "qlora-job.name" .) | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "qlora-job.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "qlora-job.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Job's own labels: Kueue reads its queue from the Job (a CronJob's jobTemplate), never from the pod template. */}}
{{- define "qlora-job.jobLabels" -}}
{{ include "qlora-job.labels" . }}
{{- with .Values.kueue.queueName }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- with .Values.jobLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* "true" where the user's resources.limits already name a GPU resource: `gpus` then adds none beside it. */}}
{{- define "qlora-job.userGpuLimit" -}}
{{- range $name, $_ := (default dict .Values.resources.limits) }}
{{- if or (eq $name $.Values.gpuResourceName) (hasPrefix "nvidia.com/" $name) }}true{{- end }}
{{- end }}
{{- end }}

{{/* "true" where the run's pod asks for a GPU, through `gpus` or its own limit. */}}
{{- define "qlora-job.requestsGpu" -}}
{{- if or (gt (int .Values.gpus) 0) (include "qlora-job.userGpuLimit" .) }}true{{- end }}
{{- end }}

{{/* Pod annotations: mesh sidecars kept out, autoscaler consolidation held off (the run's pod), then the user's. */}}
{{- define "qlora-job.podAnnotations" -}}
{{- $annotations := dict }}
{{- if .root.Values.disableSidecarInjection }}
{{- $_ := set $annotations "sidecar.istio.io/inject" "false" }}
{{- $_ := set $annotations "linkerd.io/inject" "disabled" }}
{{- end }}
{{- if and .run .root.Values.disruption.protect }}
{{- $_ := set $annotations "karpenter.sh/do-not-disrupt" "true" }}
{{- $_ := set $annotations "cluster-autoscaler.kubernetes.io/safe-to-evict" "false" }}
{{- end }}
{{- $annotations = merge (deepCopy (default dict .root.Values.podAnnotations)) $annotations }}
{{- if $annotations }}
{{- toYaml $annotations }}
{{- end }}
{{- end }}

{{/*
An environment value as the job reads it: integers exactly (YAML numbers arrive as float64, which
toString writes as 2e+06), lists and maps as JSON, everything else as its string.
*/}}
{{- define "qlora-job.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- printf "%d" (int64 .) }}
{{- else if or (kindIs "slice" .) (kindIs "map" .) }}
{{- toJson . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{- define "qlora-job.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qlora-job.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qlora-job.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qlora-job.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "qlora-job.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Exit codes that must not be retried, read from files/exit-codes.json, which `make chart-files`
generates from job/errors.py (a test keeps the two equal). 0 is success, never a failure code.
*/}}
{{- define "qlora-job.noRetryExitCodes" -}}
{{- $codes := .Files.Get "files/exit-codes.json" | fromJson }}
{{- $out := list }}
{{- range $code, $info := $codes }}
{{- if and (not $info.retry) (ne $code "0") }}
{{- $out = append $out (atoi $code) }}
{{- end }}
{{- end }}
{{- $out | toJson }}
{{- end }}

{{/* The Job spec, shared by the Job and the CronJob's jobTemplate. */}}
{{- define "qlora-job.jobSpec" -}}
backoffLimit: {{ .Values.backoffLimit }}
# A replacement pod starts once the old one has terminated, never during its checkpoint grace period.
podReplacementPolicy: Failed
{{- with .Values.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ . }}
{{- end }}
{{- if ne (toString .Values.ttlSecondsAfterFinished) "<nil>" }}
ttlSecondsAfterFinished: {{ .Values.ttlSecondsAfterFinished }}
{{- end }}
{{- if .Values.podFailurePolicy.enabled }}
podFailurePolicy:
  rules:
    # Configuration, data, verify, model-load, OOM and NaN failures repeat on retry: fail the Job.
    - action: FailJob
      onExitCodes:
        containerName: qlora-job
        operator: In
        values: {{ include "qlora-job.noRetryExitCodes" . }}
    # Preemption, API eviction (drain), taint deletion and node-pressure eviction: retry without counting.
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
{{- end }}
template:
  metadata:
    labels:
      {{- include "qlora-job.selectorLabels" . | nindent 6 }}
      {{- with .Values.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with include "qlora-job.podAnnotations" (dict "root" . "run" true) }}
    annotations:
      {{- . | nindent 6 }}
    {{- end }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "qlora-job.serviceAccountName" . }}
    automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
    terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
    {{- with .Values.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
    {{- with .Values.runtimeClassName }}
    runtimeClassName: {{ . }}
    {{- end }}
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.podSecurityContext | nindent 6 }}
    {{- with .Values.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.topologySpreadConstraints }}
    topologySpreadConstraints:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: qlora-job
        image: {{ include "qlora-job.image" . }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        # Writable (the /tmp emptyDir); Unsloth writes its compiled-kernel cache to the working directory.
        workingDir: /tmp
        securityContext:
          {{- toYaml .Values.securityContext | nindent 10 }}
        env:
          {{- include "qlora-job.env" (dict "root" . "gpu" (include "qlora-job.requestsGpu" .)) | nindent 10 }}
        {{- with .Values.envFrom }}
        envFrom:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        resources:
          {{- $resources := deepCopy .Values.resources }}
          {{- if and (gt (int .Values.gpus) 0) (not (include "qlora-job.userGpuLimit" .)) }}
          {{- $_ := set $resources "limits" (merge (dict .Values.gpuResourceName (int .Values.gpus)) (default dict $resources.limits)) }}
          {{- end }}
          {{- toYaml $resources | nindent 10 }}
        terminationMessagePath: /dev/termination-log
        terminationMessagePolicy: FallbackToLogsOnError
        volumeMounts:
          - name: tmp
            mountPath: /tmp
          - name: dshm
            mountPath: /dev/shm
          {{- with .Values.extraVolumeMounts }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
    volumes:
      # Work folder, model cache and every library cache: the root filesystem is read-only.
      - name: tmp
        {{- with .Values.workVolume.sizeLimit }}
        emptyDir:
          sizeLimit: {{ . }}
        {{- else }}
        emptyDir: {}
        {{- end }}
      # PyTorch data loader workers share batches through /dev/shm; the default 64 MiB is too small.
      - name: dshm
        emptyDir:
          medium: Memory
          sizeLimit: {{ .Values.shmSize }}
      {{- with .Values.extraVolumes }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
{{- end }}


{{/*
The container's environment (dict "root" $ "gpu" whether the pod asks for a GPU): the chart's variables, then `settings`, then `env`. A name given twice
appears once, where it first appeared, with the last value: the user's settings and env win over the
chart's own (server-side apply refuses a list with a repeated name).
*/}}
{{- define "qlora-job.env" -}}
{{- $v := .root.Values }}
{{- $env := list }}
{{- $env = append $env (dict "name" "QLORA_DATASET_URI" "value" (include "qlora-job.envValue" (required "datasetUri is required: the s3:// URI of the training JSONL, a prefix of shards, or a list" $v.datasetUri))) }}
{{- $env = append $env (dict "name" "QLORA_OUTPUT_URI" "value" (required "outputUri is required: the s3:// prefix that receives <run_id>/adapter and manifest.json" $v.outputUri)) }}
{{- $env = append $env (dict "name" "QLORA_MODEL__NAME" "value" (include "qlora-job.envValue" $v.model)) }}
{{- $env = append $env (dict "name" "QLORA_ENGINE" "value" (include "qlora-job.envValue" $v.engine)) }}
{{- if not (kindIs "invalid" $v.epochs) }}
{{- $env = append $env (dict "name" "QLORA_TRAIN__EPOCHS" "value" (include "qlora-job.envValue" $v.epochs)) }}
{{- end }}
{{- if not (kindIs "invalid" $v.maxSteps) }}
{{- $env = append $env (dict "name" "QLORA_TRAIN__MAX_STEPS" "value" (include "qlora-job.envValue" $v.maxSteps)) }}
{{- end }}
{{- if $v.runId }}
{{- $env = append $env (dict "name" "QLORA_RUN_ID" "value" (include "qlora-job.envValue" $v.runId)) }}
{{- else }}
{{- /* The Job's name: the same for every retry of this run, new for every CronJob run. */}}
{{- $env = append $env (dict "name" "QLORA_RUN_ID" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.labels['batch.kubernetes.io/job-name']"))) }}
{{- end }}
{{- $env = append $env (dict "name" "QLORA_WORK_DIR" "value" "/tmp/qlora-job") }}
{{- $env = append $env (dict "name" "QLORA_TERMINATION_LOG" "value" "/dev/termination-log") }}
{{- if .gpu }}
{{- /* GPUs were asked for: a container that sees none (driver or runtime misconfigured) exits 2 instead of training on CPU. */}}
{{- $env = append $env (dict "name" "QLORA_REQUIRE_GPU" "value" "true") }}
{{- else }}
{{- /* No GPU asked for: the image's NVIDIA_VISIBLE_DEVICES=all would still hand every GPU of the node to this pod. */}}
{{- $env = append $env (dict "name" "NVIDIA_VISIBLE_DEVICES" "value" "void") }}
{{- end }}
{{- with $v.aws.region }}
{{- $env = append $env (dict "name" "AWS_REGION" "value" (toString .)) }}
{{- end }}
{{- with $v.aws.endpointUrl }}
{{- $env = append $env (dict "name" "AWS_ENDPOINT_URL_S3" "value" (toString .)) }}
{{- end }}
{{- with $v.aws.existingSecret }}
{{- $env = append $env (dict "name" "AWS_ACCESS_KEY_ID" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" "AWS_ACCESS_KEY_ID"))) }}
{{- $env = append $env (dict "name" "AWS_SECRET_ACCESS_KEY" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" "AWS_SECRET_ACCESS_KEY"))) }}
{{- end }}
{{- with $v.hfToken.existingSecret }}
{{- $env = append $env (dict "name" "QLORA_HF_TOKEN" "valueFrom" (dict "secretKeyRef" (dict "name" . "key" $v.hfToken.key))) }}
{{- end }}
{{- range $name, $value := $v.settings }}
{{- $env = append $env (dict "name" $name "value" (include "qlora-job.envValue" $value)) }}
{{- end }}
{{- $env = concat $env $v.env }}
{{- $last := dict }}
{{- range $env }}
{{- $_ := set $last .name . }}
{{- end }}
{{- $out := list }}
{{- $seen := dict }}
{{- range $env }}
{{- if not (hasKey $seen .name) }}
{{- $_ := set $seen .name true }}
{{- $out = append $out (get $last .name) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}
