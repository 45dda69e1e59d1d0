{{/*
Names and labels.
*/}}
{{- define "switchboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchboard.fullname" -}}
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

{{- define "switchboard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchboard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "switchboard.labels" -}}
helm.sh/chart: {{ include "switchboard.chart" . }}
{{ include "switchboard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchboard
{{- end }}

{{- define "switchboard.redis.fullname" -}}
{{- printf "%s-redis" (include "switchboard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchboard.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchboard.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "switchboard.redis.labels" -}}
helm.sh/chart: {{ include "switchboard.chart" . }}
{{ include "switchboard.redis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: redis
app.kubernetes.io/part-of: switchboard
{{- end }}

{{- define "switchboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchboard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret the pods read: the user's existingSecret or the chart's.
*/}}
{{- define "switchboard.secretName" -}}
{{- .Values.existingSecret | default (include "switchboard.fullname" .) }}
{{- end }}

{{/*
One config value as an env var string. Lists of objects and maps become JSON
(WEBSOCKET_MOCK_EVENTS), other lists are joined with commas (DEVICE_APPS,
CORS_ALLOWED_ORIGINS), numbers are printed as integers (YAML numbers arrive as
float64 and would otherwise print as 1.048576e+07).
Call with (list KEY VALUE).
*/}}
{{- define "switchboard.envValue" -}}
{{- $key := index . 0 }}
{{- $v := index . 1 }}
{{- if kindIs "string" $v }}
{{- $v }}
{{- else if or (kindIs "map" $v) (eq $key "WEBSOCKET_MOCK_EVENTS") }}
{{- toJson $v }}
{{- else if kindIs "slice" $v }}
{{- join "," $v }}
{{- else if kindIs "float64" $v }}
{{- int64 $v }}
{{- else }}
{{- toString $v }}
{{- end }}
{{- end }}

{{/*
The files of `files:` that are in use, as a YAML map by values key. Each has
the setting it feeds (env), the volume name, the mount directory, the file
name inside it, and where it comes from (source: pem, secret or configMap;
ref: the Secret/ConfigMap name; key: the key in it).
*/}}
{{- define "switchboard.files" -}}
{{- $specs := dict
  "jwtPublicKey" (dict "env" "AUTH_JWT_PUBLIC_KEY_FILE" "volume" "jwt-public-key" "dir" "/etc/switchboard/jwt" "file" "public.pem" "chartKey" "jwt-public-key.pem")
  "redisCa" (dict "env" "REDIS_CA_FILE" "volume" "redis-ca" "dir" "/etc/switchboard/redis-ca" "file" "ca.crt" "chartKey" "redis-ca.pem") }}
{{- $out := dict }}
{{- range $name, $spec := $specs }}
{{- $f := index $.Values.files $name | default dict }}
{{- $source := "" }}
{{- $ref := "" }}
{{- $key := $f.key | default $spec.file }}
{{- if $f.pem }}
{{- $source = "pem" }}
{{- $ref = printf "%s-files" (include "switchboard.fullname" $) }}
{{- $key = $spec.chartKey }}
{{- else if $f.secret }}
{{- $source = "secret" }}
{{- $ref = $f.secret }}
{{- else if $f.configMap }}
{{- $source = "configMap" }}
{{- $ref = $f.configMap }}
{{- end }}
{{- if $source }}
{{- $_ := set $out $name (merge (dict "source" $source "ref" $ref "key" $key "path" (printf "%s/%s" $spec.dir $spec.file)) $spec) }}
{{- end }}
{{- end }}
{{- if $out }}{{ toYaml $out }}{{ end }}
{{- end }}

{{/*
The config map without unset (null or "") entries: the settings actually
passed, plus the paths of the files mounted from `files:`. One exception:
COMPAT_CHANNELS_PREFIX "" is passed, since the binary's default for it is
"asgi" (on) and only an empty value turns that source off.
*/}}
{{- define "switchboard.effectiveConfig" -}}
{{- $out := dict }}
{{- range $k, $v := .Values.config }}
{{- if not (or (kindIs "invalid" $v) (and (kindIs "string" $v) (eq $v "") (ne $k "COMPAT_CHANNELS_PREFIX"))) }}
{{- $_ := set $out $k (include "switchboard.envValue" (list $k $v)) }}
{{- end }}
{{- end }}
{{- range $_, $f := (include "switchboard.files" . | fromYaml) }}
{{- $_ := set $out $f.env $f.path }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Integer value of a config key, or the given default when unset. (list . KEY DEFAULT) */}}
{{- define "switchboard.configInt" -}}
{{- $root := index . 0 }}
{{- $v := index $root.Values.config (index . 1) }}
{{- if or (kindIs "invalid" $v) (eq (toString $v) "") }}
{{- index . 2 }}
{{- else }}
{{- $v | int64 }}
{{- end }}
{{- end }}

{{- define "switchboard.port" -}}
{{- include "switchboard.configInt" (list . "PORT" 8080) }}
{{- end }}

{{/* The admin port, or "" when ADMIN_PORT is unset. */}}
{{- define "switchboard.adminPort" -}}
{{- $v := .Values.config.ADMIN_PORT }}
{{- if not (or (kindIs "invalid" $v) (eq (toString $v) "")) }}
{{- $v | int64 }}
{{- end }}
{{- end }}

{{/* True (non-empty) when the pods get a REDIS_URL. */}}
{{- define "switchboard.hasRedis" -}}
{{- if or .Values.redis.enabled .Values.redis.url .Values.existingSecret .Values.externalRedis.mode }}true{{ end }}
{{- end }}

{{/*
REDIS_URL built from externalRedis ("" when mode is unset), in the forms the
fred client parses:
  redis[s]://[user:pass@]host:port[/db]
  redis[s]-cluster://[user:pass@]host:port?node=host:port&node=...
  redis[s]-sentinel://[user:pass@]host:port[/db]?node=host:port&sentinelServiceName=NAME
    [&sentinelUsername=USER&sentinelPassword=PASS]
Passwords are never in it: it holds $(REDIS_PASSWORD) and
$(REDIS_SENTINEL_PASSWORD), which Kubernetes expands from the env vars the
Deployment defines just before REDIS_URL (secretKeyRef).
*/}}
{{- define "switchboard.externalRedisUrl" -}}
{{- $r := .Values.externalRedis }}
{{- if $r.mode }}
{{- $scheme := ternary "rediss" "redis" (eq (toString $r.tls) "true") }}
{{- if ne $r.mode "standalone" }}{{ $scheme = printf "%s-%s" $scheme $r.mode }}{{ end }}
{{- $user := "" }}
{{- if $r.username }}{{ $user = urlquery $r.username | replace "+" "%20" }}{{ end }}
{{- $auth := "" }}
{{- if $r.password.existingSecret }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $user }}
{{- else if $user }}
{{- $auth = printf "%s@" $user }}
{{- end }}
{{- $hosts := $r.hosts }}
{{- $db := "" }}
{{- if and (ne $r.mode "cluster") (not (kindIs "invalid" $r.database)) (ne (toString $r.database) "") }}
{{- $db = printf "/%d" (int64 $r.database) }}
{{- end }}
{{- $query := list }}
{{- range rest $hosts }}{{ $query = append $query (printf "node=%s" .) }}{{ end }}
{{- if eq $r.mode "sentinel" }}
{{- $query = append $query (printf "sentinelServiceName=%s" (urlquery $r.sentinel.serviceName)) }}
{{- if $r.sentinel.username }}
{{- $query = append $query (printf "sentinelUsername=%s" (urlquery $r.sentinel.username)) }}
{{- end }}
{{- if $r.sentinel.password.existingSecret }}
{{- $query = append $query "sentinelPassword=$(REDIS_SENTINEL_PASSWORD)" }}
{{- end }}
{{- end }}
{{- printf "%s://%s%s%s" $scheme $auth (first $hosts) $db }}
{{- if $query }}?{{ join "&" $query }}{{ end }}
{{- end }}
{{- end }}

{{/* REDIS_URL the chart writes into its own Secret ("" when none). */}}
{{- define "switchboard.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- $host := printf "%s.%s.svc:6379" (include "switchboard.redis.fullname" .) .Release.Namespace }}
{{- if .Values.redis.auth.password }}
{{- printf "redis://:%s@%s" (urlquery .Values.redis.auth.password | replace "+" "%20") $host }}
{{- else }}
{{- printf "redis://%s" $host }}
{{- end }}
{{- else if .Values.redis.url }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* Data of the chart-managed Secret, as YAML (empty when there is none). */}}
{{- define "switchboard.secretData" -}}
{{- $out := dict }}
{{- if not .Values.existingSecret }}
{{- range $k, $v := .Values.secrets }}
{{- if $v }}
{{- $_ := set $out $k (toString $v) }}
{{- end }}
{{- end }}
{{- $url := include "switchboard.redisUrl" . }}
{{- if $url }}
{{- $_ := set $out "REDIS_URL" $url }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.auth.password }}
{{- $_ := set $out "REDIS_PASSWORD" .Values.redis.auth.password }}
{{- end }}
{{- end }}
{{- if $out }}{{ toYaml $out }}{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: long enough for the preStop sleep, the
readiness delay and the whole drain, plus slack.
*/}}
{{- define "switchboard.minGracePeriod" -}}
{{- $grace := include "switchboard.configInt" (list . "SHUTDOWN_GRACE_MS" 10000) | int64 }}
{{- $delay := include "switchboard.configInt" (list . "SHUTDOWN_READINESS_DELAY_MS" 0) | int64 }}
{{- $preStop := .Values.lifecycle.preStopSleepSeconds | int64 }}
{{- add $preStop (div (add $grace $delay 999) 1000) 5 }}
{{- end }}

{{/*
Rules the schema cannot express. Fails the render with a readable message.
*/}}
{{- define "switchboard.validate" -}}
{{- $grace := include "switchboard.configInt" (list . "SHUTDOWN_GRACE_MS" 10000) | int64 }}
{{- $delay := include "switchboard.configInt" (list . "SHUTDOWN_READINESS_DELAY_MS" 0) | int64 }}
{{- if and (gt $grace 0) (ge $delay $grace) }}
{{- fail (printf "config.SHUTDOWN_READINESS_DELAY_MS=%d must be shorter than config.SHUTDOWN_GRACE_MS=%d" $delay $grace) }}
{{- end }}
{{- $admin := include "switchboard.adminPort" . }}
{{- if and $admin (eq $admin (include "switchboard.port" .)) }}
{{- fail "config.ADMIN_PORT must differ from config.PORT" }}
{{- end }}
{{- if and .Values.externalRedis.mode (or .Values.redis.enabled .Values.redis.url) }}
{{- fail "externalRedis.mode builds REDIS_URL: set redis.enabled=false and leave redis.url empty" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.url }}
{{- fail "set either redis.enabled=true (in-chart Redis) or redis.url (external Redis), not both" }}
{{- end }}
{{- if and .Values.existingSecret (or .Values.redis.url .Values.redis.auth.password) }}
{{- fail "with existingSecret, put REDIS_URL (and REDIS_PASSWORD) in that Secret and leave redis.url and redis.auth.password empty" }}
{{- end }}
{{- if .Values.existingSecret }}
{{- range $k, $v := .Values.secrets }}
{{- if $v }}
{{- fail (printf "secrets.%s is ignored with existingSecret: put %s in that Secret instead" $k $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $f := .Values.files }}
{{- $sources := 0 }}
{{- range list "pem" "secret" "configMap" }}
{{- if index $f . }}{{ $sources = add1 $sources }}{{ end }}
{{- end }}
{{- if gt $sources 1 }}
{{- fail (printf "files.%s: set one of pem, secret or configMap, not several" $name) }}
{{- end }}
{{- end }}
{{- range $_, $f := (include "switchboard.files" . | fromYaml) }}
{{- $v := index $.Values.config $f.env }}
{{- if not (or (kindIs "invalid" $v) (eq (toString $v) "")) }}
{{- fail (printf "config.%s is set by the chart when files.* provides the file: leave config.%s null" $f.env $f.env) }}
{{- end }}
{{- end }}
{{- $publicKey := or (.Values.files.jwtPublicKey.pem) (.Values.files.jwtPublicKey.secret) (.Values.files.jwtPublicKey.configMap) (.Values.config.AUTH_JWT_PUBLIC_KEY_FILE) }}
{{- if and $publicKey .Values.secrets.AUTH_JWT_SECRET }}
{{- fail "set either secrets.AUTH_JWT_SECRET (HS256) or a public key (files.jwtPublicKey / config.AUTH_JWT_PUBLIC_KEY_FILE), not both: the binary refuses both" }}
{{- end }}
{{- if and .Values.config.WEBHOOK_URL (not .Values.secrets.WEBHOOK_SECRET) (not .Values.existingSecret) }}
{{- fail "config.WEBHOOK_URL needs secrets.WEBHOOK_SECRET (or WEBHOOK_SECRET in existingSecret): webhooks are signed" }}
{{- end }}
{{- if and (not (include "switchboard.hasRedis" .)) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "more than one replica needs a shared Redis: set redis.enabled=true, redis.url, or existingSecret with REDIS_URL (or replicaCount=1 for a single embedded node)" }}
{{- end }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $min := include "switchboard.minGracePeriod" . | int64 }}
{{- if lt (int64 .Values.terminationGracePeriodSeconds) $min }}
{{- fail (printf "terminationGracePeriodSeconds=%d is too short: needs at least %d (preStop sleep + SHUTDOWN_GRACE_MS + SHUTDOWN_READINESS_DELAY_MS + 5 s)" (int64 .Values.terminationGracePeriodSeconds) $min) }}
{{- end }}
{{- end }}
{{- end }}
