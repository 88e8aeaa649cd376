{{/* The release's full name, at most 63 characters. */}}
{{- define "graft.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "graft.operatorName" -}}
{{- printf "%s-operator" (include "graft.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "graft.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: graft
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "graft.labels" -}}
{{ include "graft.commonLabels" . }}
{{ include "graft.operatorSelectorLabels" . }}
{{- end -}}

{{- define "graft.operatorSelectorLabels" -}}
app.kubernetes.io/name: graft-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "graft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "graft.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
