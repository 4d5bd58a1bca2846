{{/* The release's name for its objects, at most 63 characters. */}}
{{- define "dispatch.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "dispatch.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The labels that select one component's pods: include "dispatch.selector" (list $ "kernel"). */}}
{{- define "dispatch.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "dispatch.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "dispatch.storeAddress" -}}
{{ include "dispatch.fullname" . }}-store:{{ .Values.store.port }}
{{- end -}}

{{- define "dispatch.apiKeySecret" -}}
{{ .Values.apiKeys.secretName | default (printf "%s-api-key" (include "dispatch.fullname" .)) }}
{{- end -}}

{{- define "dispatch.streamTokenSecret" -}}
{{ .Values.transport.streamTokens.secretName | default (printf "%s-stream-token" (include "dispatch.fullname" .)) }}
{{- end -}}

{{/* The container security context of every Dispatch container. */}}
{{- define "dispatch.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The database URL, from the Secret the operator made. */}}
{{- define "dispatch.databaseEnv" -}}
- name: DISPATCH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.secretName: the Secret holding the PostgreSQL URL" .Values.database.secretName }}
      key: {{ .Values.database.key }}
{{- end -}}

{{/* gRPC probes against grpc.health.v1 on `port`: include "dispatch.grpcProbes" (list $ port). */}}
{{- define "dispatch.grpcProbes" -}}
{{- $ := index . 0 -}}
{{- $port := index . 1 -}}
readinessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: {{ $.Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ $.Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ $.Values.probes.readiness.failureThreshold }}
livenessProbe:
  grpc:
    port: {{ $port }}
  initialDelaySeconds: {{ $.Values.probes.liveness.initialDelaySeconds }}
  periodSeconds: {{ $.Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ $.Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ $.Values.probes.liveness.failureThreshold }}
{{- end -}}

{{- define "dispatch.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
