{{- define "ktl.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ktl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "ktl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: korean-token-limiter
{{ include "ktl.selectorLabels" . }}
{{- end -}}

{{- define "ktl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ktl.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ktl.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ktl.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-secrets" (include "ktl.fullname" .)) -}}
{{- end -}}

{{- define "ktl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "ktl.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Where the gateways send requests unless config.SGLANG_URL says otherwise. */}}
{{- define "ktl.sglangUrl" -}}
{{- if .Values.config.SGLANG_URL -}}
{{- .Values.config.SGLANG_URL -}}
{{- else if .Values.sglang.enabled -}}
{{- printf "http://%s-sglang:%d" (include "ktl.fullname" .) (int .Values.sglang.port) -}}
{{- else -}}
{{- printf "http://%s-simulator:8000" (include "ktl.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* A change of settings rolls the pods that read them. */}}
{{- define "ktl.configChecksum" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{/* The settings every role reads. */}}
{{- define "ktl.envFrom" -}}
- configMapRef:
    name: {{ include "ktl.fullname" . }}-config
- secretRef:
    name: {{ include "ktl.secretName" . }}
{{- end -}}

{{/* Writable paths on the read-only root: /tmp and the state directory. */}}
{{- define "ktl.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: var
  mountPath: /app/var
{{- end -}}

{{- define "ktl.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: var
  emptyDir: {}
{{- end -}}

{{- define "ktl.podDefaults" -}}
serviceAccountName: {{ include "ktl.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
