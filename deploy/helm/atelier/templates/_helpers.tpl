{{/* Names, labels and the shared pod settings of the API and worker Deployments. */}}

{{- define "atelier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "atelier.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "atelier.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "atelier.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{- define "atelier.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "atelier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "atelier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atelier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "atelier.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "atelier.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "atelier.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end }}

{{/* ATELIER_REDIS_URL: the standalone URL, or one built for Sentinel. */}}
{{- define "atelier.redisUrl" -}}
{{- if .Values.redis.sentinel.enabled -}}
redis+sentinel://{{ if .Values.redis.password }}:{{ .Values.redis.password | urlquery }}@{{ end }}{{ join "," .Values.redis.sentinel.hosts }}/{{ .Values.redis.sentinel.masterName }}/{{ .Values.redis.db }}{{ if .Values.redis.sentinel.password }}?sentinel_password={{ .Values.redis.sentinel.password | urlquery }}{{ end }}
{{- else -}}
{{ .Values.redis.url }}
{{- end -}}
{{- end }}

{{/* Environment of both components: the ConfigMap, the chart's Secret, an existing Secret. */}}
{{- define "atelier.envFrom" -}}
- configMapRef:
    name: {{ include "atelier.fullname" . }}
- secretRef:
    name: {{ include "atelier.fullname" . }}
{{- if .Values.secrets.existingSecret }}
- secretRef:
    name: {{ .Values.secrets.existingSecret }}
{{- end }}
{{- end }}

{{- define "atelier.env" -}}
- name: ATELIER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}

{{/* Pod-level settings shared by both Deployments. */}}
{{- define "atelier.podSpec" -}}
serviceAccountName: {{ include "atelier.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  # Large outputs are spooled to disk on their way to storage; the root filesystem is read-only.
  - name: tmp
    emptyDir: {}
{{- end }}

{{/* PromQL for the workers' autoscaler: due entries of the jobs queue. */}}
{{- define "atelier.queueDepthQuery" -}}
{{- if .Values.worker.autoscaling.query -}}
{{ .Values.worker.autoscaling.query }}
{{- else -}}
max(atelier_queue_jobs{queue="{{ .Values.queue.name }}",state="due"})
{{- end -}}
{{- end }}
