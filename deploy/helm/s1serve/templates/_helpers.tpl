{{- define "s1serve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "s1serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "s1serve.labels" -}}
app.kubernetes.io/name: {{ include "s1serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "s1serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "s1serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{/* `s1serve serve` arguments: server values, then every engine key as --key-with-dashes. */}}
{{- define "s1serve.serverArgs" -}}
- serve
- --model
- {{ printf "%s/%s" .Values.model.mountPath .Values.model.subPath | clean | quote }}
- --host
- "0.0.0.0"
- --grpc-port
- {{ .Values.server.grpcPort | quote }}
- --http-port
- {{ .Values.server.httpPort | quote }}
- --max-waiting-requests
- {{ .Values.server.maxWaitingRequests | quote }}
- --default-max-tokens
- {{ .Values.server.defaultMaxTokens | quote }}
- --drain-timeout-s
- {{ .Values.server.drainTimeoutSeconds | quote }}
{{- with .Values.model.servedModelName }}
- --served-model-name
- {{ . | quote }}
{{- end }}
{{- range $key, $value := .Values.engine }}
{{- $flag := printf "--%s" ($key | replace "_" "-") }}
{{- if kindIs "bool" $value }}
- {{ ternary $flag (printf "--no-%s" ($key | replace "_" "-")) $value }}
{{- else if not (kindIs "invalid" $value) }}
- {{ $flag }}
- {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}
