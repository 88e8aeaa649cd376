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

{{- define "graft.serverAccountName" -}}
{{- printf "%s-server" (include "graft.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The username the operator's ServiceAccount token authenticates as. */}}
{{- define "graft.operatorUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "graft.serviceAccountName" . }}
{{- end -}}

{{/* The audience of the operator's token for the servers' admin API. */}}
{{- define "graft.adminAudience" -}}
graft-server.{{ .Release.Namespace }}.{{ include "graft.fullname" . }}
{{- end -}}

{{- define "graft.operatorRules" -}}
- apiGroups: ["graft.dev"]
  resources: ["finetunejobs", "servergrants"]
  verbs: ["get", "list", "watch"]
# patch: the unload finalizer.
- apiGroups: ["graft.dev"]
  resources: ["adapterdeployments"]
  verbs: ["get", "list", "watch", "patch"]
# get as well as patch: the per-job Role the operator makes grants its trainer both, and RBAC
# lets nobody grant what they do not hold.
- apiGroups: ["graft.dev"]
  resources: ["finetunejobs/status", "adapterdeployments/status"]
  verbs: ["get", "patch"]
# Children carry blockOwnerDeletion owner references to their FineTuneJob.
- apiGroups: ["graft.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.rbac.secretsPreCheck }}
# Only to see that a job's storage Secret exists before its Job is made (metadata is read,
# but RBAC cannot grant less than the whole object).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end -}}
