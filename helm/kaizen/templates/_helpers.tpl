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
