{{- define "reranker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "reranker.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "reranker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reranker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "reranker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "reranker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "reranker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "reranker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "reranker.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.gpu.enabled -}}
{{- $repo := default .Values.image.repository .Values.gpu.image.repository -}}
{{- printf "%s:%s" $repo (default (printf "%s-cuda" $tag) .Values.gpu.image.tag) -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The port of config.http.listen (IP:PORT, default 0.0.0.0:9464): container port, probes, Service. */}}
{{- define "reranker.httpPort" -}}
{{- $http := default dict .Values.config.http -}}
{{- $listen := toString (default "0.0.0.0:9464" $http.listen) -}}
{{- $port := regexFind "[0-9]+$" $listen -}}
{{- if or (not $port) (eq $port "0") -}}
{{- fail (printf "config.http.listen must be IP:PORT with a fixed port for the probes (got %q)" $listen) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* config.shutdown.drain_timeout_ms in whole seconds, rounded up (the binary's default is 20000). */}}
{{- define "reranker.drainSeconds" -}}
{{- $shutdown := default dict .Values.config.shutdown -}}
{{- $ms := int64 (default 20000 $shutdown.drain_timeout_ms) -}}
{{- div (add $ms 999) 1000 -}}
{{- end -}}

{{- define "reranker.terminationGracePeriodSeconds" -}}
{{- $drain := int64 (include "reranker.drainSeconds" .) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $drain .Values.terminationGraceExtraSeconds -}}
{{- else -}}
{{- $t := int64 .Values.terminationGracePeriodSeconds -}}
{{- if le $t $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed config.shutdown.drain_timeout_ms (%ds), or SIGKILL cuts the drain short" $t $drain) -}}
{{- end -}}
{{- $t -}}
{{- end -}}
{{- end -}}

{{/*
values.config as TOML. Numbers, strings, booleans and lists of them go through toJson, whose
output is valid TOML for each (and prints whole numbers without the ".0" that Helm's float64 values
would otherwise get, which u64 keys reject). Keys outside [A-Za-z0-9_-] (librdkafka's dotted
names) are quoted. Nulls are left out, so the built-in default applies.
*/}}
{{- define "reranker.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "reranker.tomlTable" -}}
{{- $prefix := .prefix -}}
{{- range $k, $v := .table -}}
{{- if kindIs "slice" $v -}}
{{- range $v -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) -}}
{{- fail (printf "config.%s%s: lists of tables are not supported" $prefix $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) }}
{{ include "reranker.tomlKey" $k }} = {{ toJson $v }}
{{- end -}}
{{- end -}}
{{- range $k, $v := .table -}}
{{- if kindIs "map" $v -}}
{{- $name := printf "%s%s" $prefix (include "reranker.tomlKey" $k) }}

[{{ $name }}]
{{- include "reranker.tomlTable" (dict "prefix" (printf "%s." $name) "table" $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "reranker.configToml" -}}
# Rendered by the reranker Helm chart from values.config; `reranker config --config FILE` prints
# the effective configuration.
{{- include "reranker.tomlTable" (dict "prefix" "" "table" .Values.config) }}
{{ end -}}

{{/* Refuses values that would deploy something broken; included by the Deployment. */}}
{{- define "reranker.validate" -}}
{{- $partitions := int64 .Values.kafka.partitions -}}
{{- if not .Values.kafka.allowReplicasAbovePartitions -}}
{{- if and .Values.autoscaling.enabled (gt (int64 .Values.autoscaling.maxReplicas) $partitions) -}}
{{- fail (printf "autoscaling.maxReplicas (%d) exceeds kafka.partitions (%d): replicas beyond the partition count get no partitions and sit idle; raise kafka.partitions or set kafka.allowReplicasAbovePartitions=true" (int64 .Values.autoscaling.maxReplicas) $partitions) -}}
{{- end -}}
{{- if and (not .Values.autoscaling.enabled) (gt (int64 .Values.replicaCount) $partitions) -}}
{{- fail (printf "replicaCount (%d) exceeds kafka.partitions (%d): replicas beyond the partition count sit idle; set kafka.allowReplicasAbovePartitions=true to keep standbys" (int64 .Values.replicaCount) $partitions) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int64 .Values.autoscaling.minReplicas) (int64 .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas exceeds autoscaling.maxReplicas" -}}
{{- end -}}
{{- $http := default dict .Values.config.http -}}
{{- if and (hasKey $http "enabled") (not $http.enabled) -}}
{{- fail "config.http.enabled=false: the probes need /healthz and /readyz" -}}
{{- end -}}
{{- $model := default dict .Values.config.model -}}
{{- $device := default "cpu" $model.device -}}
{{- if and .Values.gpu.enabled (eq $device "cpu") -}}
{{- fail "gpu.enabled=true with config.model.device=cpu would hold a GPU and not use it: set config.model.device=cuda (values-gpu.yaml does)" -}}
{{- end -}}
{{- if and (not .Values.gpu.enabled) (eq $device "cuda") -}}
{{- fail "config.model.device=cuda needs gpu.enabled=true (GPU request, CUDA image, GPU nodes)" -}}
{{- end -}}
{{- $kafka := default dict .Values.config.kafka -}}
{{- range $section := list "client" "consumer" "producer" -}}
{{- $m := default dict (get $kafka $section) -}}
{{- if or (hasKey $m "sasl.password") (hasKey $m "sasl_password") -}}
{{- fail (printf "config.kafka.%s has sasl.password: it would be stored in a ConfigMap; use kafka.saslPasswordSecret" $section) -}}
{{- end -}}
{{- end -}}
{{- end -}}
