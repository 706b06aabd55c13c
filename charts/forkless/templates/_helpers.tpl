{{/* The release's full name, used for every object of the chart. */}}
{{- define "forkless.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Immutable labels: the Deployment's selector, the Services' selectors, the PDB's. */}}
{{- define "forkless.selectorLabels" -}}
app.kubernetes.io/name: forkless-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "forkless.labels" -}}
{{ include "forkless.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: forkless
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "forkless.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "forkless.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name must be set when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "forkless.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Whether the ServiceMonitor is rendered: asked for, and its API served (or forced). */}}
{{- define "forkless.serviceMonitor" -}}
{{- $monitor := .Values.metrics.serviceMonitor -}}
{{- if and .Values.metrics.enabled $monitor.enabled (or $monitor.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor")) -}}
true
{{- end -}}
{{- end -}}

{{/*
Exactly the calls the operator makes (operator/forkless_operator/handlers.py, apply.py):
kopf watches InferenceServices and patches their annotations; status goes through
/status by server-side apply; children are server-side applied (patch, and create
when they do not exist yet), watched, and the optional ones (HPA, PDB) deleted;
pods are watched for status; a pvc:// model's claim is read; kopf posts events.
No secrets, no nodes, no configmaps.
*/}}
{{- define "forkless.rules" }}
- apiGroups: [serving.forkless.dev]
  resources: [inferenceservices]
  verbs: [get, list, watch, patch]
- apiGroups: [serving.forkless.dev]
  resources: [inferenceservices/status]
  verbs: [get, patch, update]
# Children carry ownerReferences with blockOwnerDeletion, which clusters with the
# OwnerReferencesPermissionEnforcement admission plugin allow only with this.
- apiGroups: [serving.forkless.dev]
  resources: [inferenceservices/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
# KEDA's ScaledObjects, for autoscaling.class keda (nothing is read or written where KEDA is absent).
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, list, watch, create, patch, delete]
# KubeRay's RayServices, for engine ray (nothing is read or written where KubeRay is absent).
- apiGroups: [ray.io]
  resources: [rayservices]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
# Download credentials as KServe keeps them: the pods' ServiceAccount and the Secrets it lists (or
# the one the serving.kserve.io/storageSecretName annotation names). Read by name only, never listed
# or watched; the values reach the pods by secretKeyRef, not through the operator.
{{- if .Values.rbac.readStorageCredentials }}
- apiGroups: [""]
  resources: [serviceaccounts, secrets]
  verbs: [get]
{{- end }}
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
{{- define "forkless.peeringRules" }}
- apiGroups: [kopf.dev]
  resources: [{{ .resource }}]
  verbs: [get, list, watch, patch]
{{- end }}
