{{/* The namespace of every namespaced object. */}}
{{- define "ambit.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end }}

{{/* Namespaces whose pods never wait for the agent on their sandbox: the configured ones and
Ambit's own (its CA must start while agents are down). */}}
{{- define "ambit.cniExcludedNamespaces" -}}
{{- append .Values.cni.excludeNamespaces (include "ambit.namespace" .) | uniq | join "," -}}
{{- end }}

{{/* Ambit's image. */}}
{{- define "ambit.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end }}

{{/* The host name agents dial for the CA (the CA's Service). */}}
{{- define "ambit.caHost" -}}
{{- printf "ambit-ca.%s.svc" (include "ambit.namespace" .) -}}
{{- end }}

{{/*
Labels of an object: (dict "ctx" $ "name" NAME "component" COMPONENT). The first two are the
selector labels; the pod templates carry only the first three.
*/}}
{{- define "ambit.podLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: ambit
{{- end }}

{{- define "ambit.labels" -}}
{{ include "ambit.podLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}
