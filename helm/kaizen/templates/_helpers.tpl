{{/* Names and labels. */}}
{{- define "kaizen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kaizen.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kaizen.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kaizen.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kaizen
{{- end }}

{{- define "kaizen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kaizen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kaizen.secretName" -}}
{{- default (printf "%s-secrets" (include "kaizen.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "kaizen.claimName" -}}
{{- default (printf "%s-data" (include "kaizen.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "kaizen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kaizen.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kaizen.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/* Environment of both processes: the ConfigMap, then the secrets. */}}
{{- define "kaizen.envFrom" -}}
- configMapRef:
    name: {{ include "kaizen.fullname" . }}-config
- secretRef:
    name: {{ include "kaizen.secretName" . }}
{{- if .Values.kafka.security.credentialsSecret }}
- secretRef:   # KAIZEN_KAFKA_SASL_USERNAME, KAIZEN_KAFKA_SASL_PASSWORD
    name: {{ .Values.kafka.security.credentialsSecret }}
{{- end }}
{{- end }}

{{/* Prepares the default model on the shared volume once; a lock keeps two pods from racing. */}}
{{- define "kaizen.modelPrepare" -}}
- name: model-prepare
  image: {{ include "kaizen.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["flock", "/shared/.model-prepare.lock", "kaizen", "model", "prepare"]
  env:
    - name: KAIZEN_DATA_DIR
      value: /shared
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: shared, mountPath: /shared}
    - {name: tmp, mountPath: /tmp}
    - {name: home, mountPath: /home/kaizen}
{{- end }}

{{- define "kaizen.sharedVolume" -}}
- name: shared
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "kaizen.claimName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "kaizen.resources" -}}
{{- $res := deepCopy .resources }}
{{- if gt (int .gpu) 0 }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpu) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* The trainer's distributed layout: a StatefulSet of nnodes pods when nnodes > 1, else one Deployment pod. */}}
{{- define "kaizen.trainerMultiNode" -}}
{{- if gt (int .Values.trainer.distributed.nnodes) 1 }}true{{ end }}
{{- end }}

{{- define "kaizen.trainerHeadlessName" -}}
{{ include "kaizen.fullname" . }}-trainer-headless
{{- end }}

{{/* The rank-0 pod's stable DNS name (StatefulSet pod <name>-0 through the headless Service). */}}
{{- define "kaizen.trainerMasterAddr" -}}
{{ include "kaizen.fullname" . }}-trainer-0.{{ include "kaizen.trainerHeadlessName" . }}.{{ .Release.Namespace }}.svc
{{- end }}

{{/* Values the trainer cannot run with, refused with the reason. */}}
{{- define "kaizen.trainerChecks" -}}
{{- $d := .Values.trainer.distributed }}
{{- $gpu := int (default 0 .Values.trainer.gpu) }}
{{- if eq $d.backend "nccl" }}
{{- if eq $gpu 0 }}
{{- fail "trainer.distributed.backend nccl needs trainer.gpu > 0: NCCL only runs between CUDA devices (use auto or gloo on CPU)" }}
{{- end }}
{{- end }}
{{- if and (gt $gpu 0) (ne $d.backend "gloo") (gt (int $d.nprocPerNode) $gpu) }}
{{- fail (printf "trainer.distributed.nprocPerNode (%d) exceeds trainer.gpu (%d): with NCCL every process needs a GPU of its own (set nprocPerNode <= gpu, or backend gloo)" (int $d.nprocPerNode) $gpu) }}
{{- end }}
{{- if include "kaizen.trainerMultiNode" . }}
{{- if not (and .Values.persistence.enabled (has "ReadWriteMany" .Values.persistence.accessModes)) }}
{{- fail "trainer.distributed.nnodes > 1 needs persistence.enabled with accessModes [ReadWriteMany]: every trainer node reads the model registry and the reward models on the shared volume, and pods on different nodes can only share a ReadWriteMany claim (with persistence.existingClaim, set accessModes to the claim's mode)" }}
{{- end }}
{{- if semverCompare "<1.28.0-0" .Capabilities.KubeVersion.Version }}
{{- fail "trainer.distributed.nnodes > 1 needs Kubernetes 1.28 or later: each pod's node rank comes from the StatefulSet's apps.kubernetes.io/pod-index label" }}
{{- end }}
{{- if gt (len (include "kaizen.trainerHeadlessName" .)) 63 }}
{{- fail (printf "the trainer's headless Service name %s is longer than 63 characters: shorten the release name or set fullnameOverride" (include "kaizen.trainerHeadlessName" .)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The trainer's pod template, shared by its Deployment (nnodes 1) and StatefulSet (nnodes > 1). */}}
{{- define "kaizen.trainerPodTemplate" -}}
{{- include "kaizen.trainerChecks" . }}
{{- $d := .Values.trainer.distributed }}
{{- $multi := include "kaizen.trainerMultiNode" . }}
metadata:
  labels:
    {{- include "kaizen.labels" . | nindent 4 }}
    app.kubernetes.io/component: trainer
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- with .Values.trainer.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "kaizen.serviceAccountName" . }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: 60
  initContainers:
    {{- include "kaizen.modelPrepare" . | nindent 4 }}
  containers:
    - name: trainer
      image: {{ include "kaizen.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      # On node rank 0: the daemon (consumer, rounds); on the others: a worker
      # that joins every round. Each launches torchrun itself when nnodes x
      # nprocPerNode > 1.
      command: ["kaizen", "train"]
      envFrom:
        {{- include "kaizen.envFrom" . | nindent 8 }}
      env:
        - name: KAIZEN_DATA_DIR
          value: /shared
        - name: KAIZEN_TRAINER_HOST
          value: 0.0.0.0
        - name: KAIZEN_TRAINER_PORT
          value: "8001"
        - name: KAIZEN_TRAIN_NPROC_PER_NODE
          value: {{ $d.nprocPerNode | int | quote }}
        - name: KAIZEN_TRAIN_BACKEND
          value: {{ $d.backend | quote }}
        - name: KAIZEN_TRAIN_DIST_TIMEOUT_S
          value: {{ $d.timeoutSeconds | int | quote }}
        - name: KAIZEN_TRAIN_MASTER_PORT
          value: {{ $d.masterPort | int | quote }}
        {{- if $multi }}
        - name: KAIZEN_TRAIN_NNODES
          value: {{ $d.nnodes | int | quote }}
        - name: KAIZEN_TRAIN_NODE_RANK   # the StatefulSet ordinal: pod <name>-0 is rank 0
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        - name: KAIZEN_TRAIN_MASTER_ADDR
          value: {{ include "kaizen.trainerMasterAddr" . }}
        {{- end }}
        {{- range $name, $value := $d.env }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: 8001
          protocol: TCP
        {{- if $multi }}
        - name: rendezvous
          containerPort: {{ $d.masterPort }}
          protocol: TCP
        {{- end }}
      startupProbe:
        httpGet: {path: /metrics, port: metrics}
        periodSeconds: 5
        failureThreshold: 60
      livenessProbe:
        httpGet: {path: /metrics, port: metrics}
        periodSeconds: 30
        timeoutSeconds: 10
      readinessProbe:   # ready once its consumer has joined the group (rank 0) or its worker loop runs
        exec:
          command: ["python", "-c", "import sys, urllib.request; sys.exit(b'kaizen_trainer_ready 1.0' not in urllib.request.urlopen('http://127.0.0.1:8001/metrics', timeout=5).read())"]
        periodSeconds: 15
        timeoutSeconds: 10
      resources:
        {{- include "kaizen.resources" .Values.trainer | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - {name: shared, mountPath: /shared}
        - {name: tmp, mountPath: /tmp}
        - {name: home, mountPath: /home/kaizen}
        - {name: shm, mountPath: /dev/shm}
        {{- include "kaizen.kafkaCaMount" . | nindent 8 }}
  volumes:
    {{- include "kaizen.sharedVolume" . | nindent 4 }}
    {{- include "kaizen.kafkaCaVolume" . | nindent 4 }}
    - name: tmp
      emptyDir: {}
    - name: home
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.trainer.shmSize }}
  {{- with .Values.trainer.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.trainer.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.trainer.affinity }}
  affinity:
    {{- toYaml .Values.trainer.affinity | nindent 4 }}
  {{- else if $multi }}
  affinity:   # one trainer pod per machine where the cluster allows it
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "kaizen.selectorLabels" . | nindent 16 }}
                app.kubernetes.io/component: trainer
  {{- end }}
{{- end }}

{{/* The API's shared store: "true" when a database URL is given, named in a Secret, or run in the release. */}}
{{- define "kaizen.databaseConfigured" -}}
{{- if or .Values.database.existingSecret .Values.database.url .Values.database.postgresql.enabled }}true{{ end }}
{{- end }}

{{- define "kaizen.databaseSecretName" -}}
{{- default (printf "%s-database" (include "kaizen.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{/* Values the chat API cannot run with, refused with the reason. */}}
{{- define "kaizen.apiChecks" -}}
{{- if and .Values.database.postgresql.enabled (or .Values.database.url .Values.database.existingSecret) }}
{{- fail "database.postgresql.enabled runs a server in the release: leave database.url and database.existingSecret empty with it (or disable it to use yours)" }}
{{- end }}
{{- $many := or (gt (int .Values.api.replicas) 1) (and .Values.api.autoscaling.enabled (gt (int .Values.api.autoscaling.maxReplicas) 1)) }}
{{- if and $many (not (include "kaizen.databaseConfigured" .)) }}
{{- fail "api.replicas > 1 (or autoscaling) needs a shared database: set database.url, database.existingSecret or database.postgresql.enabled. Without one each API pod keeps comparisons and votes in its own SQLite file: a vote reaches the pod that served its pair one time in N (the others answer 404), and each pod would judge canaries from its own votes" }}
{{- end }}
{{- end }}

{{/* Pods that may reach Kafka and the database: this release's API and trainer. */}}
{{- define "kaizen.dataClients" -}}
matchLabels:
  {{- include "kaizen.selectorLabels" . | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: In, values: [api, trainer]}
{{- end }}

{{/* The Kafka CA certificate (kafka.security.caSecret), for the API and trainer pods. */}}
{{- define "kaizen.kafkaCaVolume" -}}
{{- if .Values.kafka.security.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.security.caSecret }}
{{- end }}
{{- end }}

{{- define "kaizen.kafkaCaMount" -}}
{{- if .Values.kafka.security.caSecret }}
- {name: kafka-ca, mountPath: /etc/kaizen/kafka-ca, readOnly: true}
{{- end }}
{{- end }}
