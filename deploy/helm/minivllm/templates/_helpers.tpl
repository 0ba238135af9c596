{{/* Names and labels, as `helm create` makes them. */}}
{{- define "minivllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "minivllm.fullname" -}}
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

{{- define "minivllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "minivllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "minivllm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "minivllm.selectorLabels" . }}
app.kubernetes.io/version: {{ include "minivllm.imageTag" . | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Kueue: the queue (and priority) labels, on the Deployment and on its pods. */}}
{{- define "minivllm.kueueLabels" -}}
{{- with .Values.kueue.queueName }}
kueue.x-k8s.io/queue-name: {{ . | quote }}
{{- end }}
{{- with .Values.kueue.priorityClass }}
kueue.x-k8s.io/priority-class: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "minivllm.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* GPUs one pod asks for: tensorParallelSize, or none on CPU. */}}
{{- define "minivllm.gpus" -}}
{{- if .Values.gpu.enabled }}{{ int .Values.tensorParallelSize }}{{ else }}0{{ end }}
{{- end }}

{{/* resources with nvidia.com/gpu set from tensorParallelSize (a limit: the request follows it). */}}
{{- define "minivllm.resources" -}}
{{- $res := deepCopy (.Values.resources | default dict) }}
{{- if .Values.gpu.enabled }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.tensorParallelSize) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "minivllm.claimName" -}}
{{- .Values.modelStorage.pvc.existingClaim | default (printf "%s-models" (include "minivllm.fullname" .)) }}
{{- end }}
