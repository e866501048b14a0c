{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "loraplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: "<release>-<chart>", or the release name when it already holds the chart name. */}}
{{- define "loraplane.fullname" -}}
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

{{/* Labels on every resource. */}}
{{- define "loraplane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "loraplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraplane
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "server"). */}}
{{- define "loraplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplane.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's resources: common labels plus the component. */}}
{{- define "loraplane.componentLabels" -}}
{{ include "loraplane.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Pod labels: the component's labels, then the extra ones (which cannot override them). */}}
{{- define "loraplane.podLabels" -}}
{{- $labels := fromYaml (include "loraplane.componentLabels" .) }}
{{- toYaml (merge $labels (.extra | default dict)) }}
{{- end }}

{{/* "repository:tag", the tag defaulting to the chart's appVersion. Call with an image map and $. */}}
{{- define "loraplane.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag | toString) }}
{{- end }}

{{- define "loraplane.operator.fullname" -}}
{{- printf "%s-operator" (include "loraplane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplane.server.fullname" -}}
{{- printf "%s-server" (include "loraplane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "loraplane.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "loraplane.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* One flag value as text: integral numbers without an exponent or a decimal point, maps as JSON
(a `--lora-paths` item {lora_name, lora_path, pinned}). */}}
{{- define "loraplane.argValue" -}}
{{- if kindIs "map" . }}
{{- toJson . }}
{{- else if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
The server's command-line flags from .Values.server.args (camelCase keys, one per flag of
loraplane-server), as a YAML list: null/false/""/[] leave a flag out, true gives a bare flag, a
list gives the flag followed by each item, anything else `--flag=value`.
*/}}
{{- define "loraplane.server.args" -}}
{{- $args := deepCopy .Values.server.args }}
{{- if not $args.device }}
{{- $_ := set $args "device" (ternary "cuda" "cpu" (gt (int .Values.server.gpu) 0)) }}
{{- end }}
- --host={{ .Values.server.host }}
- --port={{ .Values.server.port }}
{{- range $key, $value := $args }}
{{- $flag := printf "--%s" (kebabcase $key) }}
{{- if kindIs "bool" $value }}
{{- if $value }}
- {{ $flag }}
{{- end }}
{{- else if kindIs "slice" $value }}
{{- if $value }}
- {{ $flag }}
{{- range $value }}
- {{ include "loraplane.argValue" . | quote }}
{{- end }}
{{- end }}
{{- else if kindIs "map" $value }}
{{- fail (printf "server.args.%s: a map is not a flag value (a --lora-paths JSON item goes in quotes)" $key) }}
{{- else if not (kindIs "invalid" $value) }}
{{- if ne (toString $value) "" }}
- {{ printf "%s=%s" $flag (include "loraplane.argValue" $value) | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.server.apiKey.existingSecret }}
{{- if .Values.server.args.apiKey }}
{{- fail "set server.apiKey.existingSecret or server.args.apiKey, not both" }}
{{- end }}
- --api-key=$(LORAPLANE_API_KEY)
{{- end }}
{{- range .Values.server.extraArgs }}
- {{ include "loraplane.argValue" . | quote }}
{{- end }}
{{- end }}
