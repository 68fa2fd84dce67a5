{{/*
Names and labels, as `helm create` writes them.
*/}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "herald.fullname" -}}
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

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
{{ include "herald.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The `helm test` pod: deliberately not matched by the Deployment's selector. */}}
{{- define "herald.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "herald.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret that holds herald's secrets: the existing one, or the chart's. */}}
{{- define "herald.secretName" -}}
{{- default (include "herald.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* "true" when auth.algorithms lists an HS* algorithm. */}}
{{- define "herald.usesHmac" -}}
{{- $found := false }}
{{- range .Values.config.auth.algorithms }}
{{- if hasPrefix "HS" . }}{{ $found = true }}{{ end }}
{{- end }}
{{- ternary "true" "" $found }}
{{- end }}

{{/* "true" when auth.algorithms lists an asymmetric algorithm and no
auth.jwks_url gives the keys: a public key file is needed. */}}
{{- define "herald.usesPublicKey" -}}
{{- $found := false }}
{{- range .Values.config.auth.algorithms }}
{{- if not (hasPrefix "HS" .) }}{{ $found = true }}{{ end }}
{{- end }}
{{- ternary "true" "" (and $found (not .Values.config.auth.jwks_url)) }}
{{- end }}

{{- define "herald.scheme" -}}
{{- ternary "HTTPS" "HTTP" .Values.tls.enabled }}
{{- end }}

{{- define "herald.portName" -}}
{{- ternary "https" "http" .Values.tls.enabled }}
{{- end }}

{{/* Where the projected configuration volume is mounted. */}}
{{- define "herald.configDir" -}}/etc/herald{{- end }}

{{/* The smallest number of pods the Deployment can run with. */}}
{{- define "herald.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.minReplicas | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds. The kubelet counts the grace period from the
moment it starts the preStop hook, and sends SIGTERM when the hook returns,
so the period must cover the preStop sleep plus herald's whole shutdown
deadline (which itself covers the paced drain). An explicit value that does
not is refused.
*/}}
{{- define "herald.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- $minimum := add $s.preStopSleepSeconds $s.timeoutSeconds 1 }}
{{- if $s.terminationGracePeriodSeconds }}
{{- if lt (int $s.terminationGracePeriodSeconds) (int $minimum) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) is too short: it must cover shutdown.preStopSleepSeconds (%d) + shutdown.timeoutSeconds (%d), so at least %d; otherwise the kubelet kills herald in the middle of its drain" (int $s.terminationGracePeriodSeconds) (int $s.preStopSleepSeconds) (int $s.timeoutSeconds) (int $minimum)) }}
{{- end }}
{{- $s.terminationGracePeriodSeconds | int }}
{{- else }}
{{- add $s.preStopSleepSeconds $s.timeoutSeconds $s.terminationMarginSeconds }}
{{- end }}
{{- end }}

{{/*
Checks that no JSON schema can express. Included by the Deployment, so that
any rendering fails with a message naming the values to fix.
*/}}
{{- define "herald.validate" -}}
{{- $s := .Values.shutdown }}
{{- if lt (int $s.timeoutSeconds) (add $s.drainPeriodSeconds 5 | int) }}
{{- fail (printf "shutdown.timeoutSeconds (%d) must be at least shutdown.drainPeriodSeconds (%d) + 5: herald's shutdown.timeout must cover shutdown.drain_period plus the last close handshakes, or it refuses to start" (int $s.timeoutSeconds) (int $s.drainPeriodSeconds)) }}
{{- end }}
{{- $kind := .Values.config.broker.kind }}
{{- if and (eq $kind "memory") (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "config.broker.kind \"memory\" keeps messages inside one pod: with replicaCount > 1 or autoscaling.enabled, use redis, redis-sentinel or redis-cluster" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not be greater than autoscaling.maxReplicas" }}
{{- end }}
{{- if eq $kind "redis-sentinel" }}
{{- if not .Values.config.broker.sentinels }}
{{- fail "config.broker.sentinels is required when config.broker.kind is \"redis-sentinel\" (a list of host:port)" }}
{{- end }}
{{- if not .Values.config.broker.master_name }}
{{- fail "config.broker.master_name is required when config.broker.kind is \"redis-sentinel\"" }}
{{- end }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- if and (include "herald.usesHmac" .) (not .Values.secrets.hmacSecret) }}
{{- fail "config.auth.algorithms lists an HS* algorithm: set secrets.existingSecret (preferred) or secrets.hmacSecret (at least 32 bytes); the chart never generates one" }}
{{- end }}
{{- if and (include "herald.usesPublicKey" .) (not .Values.secrets.jwtPublicKey) }}
{{- fail "config.auth.algorithms lists an asymmetric algorithm: set secrets.existingSecret or secrets.jwtPublicKey (PEM)" }}
{{- end }}
{{- if and (eq $kind "redis") (not .Values.secrets.brokerUrl) }}
{{- fail "config.broker.kind is \"redis\": set secrets.existingSecret or secrets.brokerUrl (redis://:PASSWORD@HOST:6379/0)" }}
{{- end }}
{{- if and (eq $kind "redis-cluster") (not .Values.secrets.brokerClusterUrls) }}
{{- fail "config.broker.kind is \"redis-cluster\": set secrets.existingSecret or secrets.brokerClusterUrls (comma-separated redis:// URLs)" }}
{{- end }}
{{- end }}
{{- if and .Values.jwksCa.configMap (not .Values.config.auth.jwks_url) }}
{{- fail "jwksCa.configMap is set but config.auth.jwks_url is not" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName, a kubernetes.io/tls Secret" }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" }}
{{- end }}
{{- end }}

{{/*
herald's configuration: the `config` values plus what the chart manages
(listen address, TLS and key file paths, shutdown timing), as a dict.
*/}}
{{- define "herald.configDict" -}}
{{- $config := deepCopy .Values.config }}
{{- $dir := include "herald.configDir" . }}
{{- $server := default dict $config.server }}
{{- $_ := set $server "listen" (printf "%s:%d" .Values.listenHost (int .Values.containerPort)) }}
{{- if .Values.tls.enabled }}
{{- $tls := default dict $server.tls }}
{{- $_ := set $tls "cert_file" (printf "%s/tls/tls.crt" $dir) }}
{{- $_ := set $tls "key_file" (printf "%s/tls/tls.key" $dir) }}
{{- if .Values.tls.clientAuth }}
{{- $_ := set $tls "client_ca_file" (printf "%s/tls/ca.crt" $dir) }}
{{- end }}
{{- $_ := set $server "tls" $tls }}
{{- else }}
{{- $_ := unset $server "tls" }}
{{- end }}
{{- $_ := set $config "server" $server }}
{{- if include "herald.usesPublicKey" . }}
{{- $_ := set $config.auth "public_key_file" (printf "%s/jwt/public-key.pem" $dir) }}
{{- end }}
{{- if not $config.auth.jwks_url }}
{{- range list "jwks_url" "jwks_refresh_interval" "jwks_min_refresh_interval" "jwks_timeout" "jwks_max_bytes" }}
{{- $_ := unset $config.auth . }}
{{- end }}
{{- else if .Values.jwksCa.configMap }}
{{- $_ := set $config.auth "jwks_ca_file" (printf "%s/jwks/ca.pem" $dir) }}
{{- end }}
{{- if ne $config.broker.kind "redis-sentinel" }}
{{- $_ := unset $config.broker "sentinels" }}
{{- $_ := unset $config.broker "master_name" }}
{{- end }}
{{- $_ := set $config "shutdown" (dict "drain_period" (printf "%ds" (int .Values.shutdown.drainPeriodSeconds)) "timeout" (printf "%ds" (int .Values.shutdown.timeoutSeconds))) }}
{{- toJson $config }}
{{- end }}

{{/*
One TOML table: scalar and list keys as `key = <JSON>`, then sub-tables.
JSON strings, numbers, booleans and arrays of them are valid TOML values,
and, unlike toToml, toJson writes whole numbers without a fractional part,
which herald's integer keys need. Empty strings and nulls mean "unset" and
are left out.
*/}}
{{- define "herald.tomlTable" -}}
{{- $prefix := .prefix }}
{{- $table := .table }}
{{- if $prefix }}
[{{ $prefix }}]
{{- end }}
{{- range $key, $value := $table }}
{{- if not (or (kindIs "map" $value) (kindIs "invalid" $value) (and (kindIs "string" $value) (eq $value ""))) }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- range $key, $value := $table }}
{{- if kindIs "map" $value }}
{{ include "herald.tomlTable" (dict "prefix" (ternary $key (printf "%s.%s" $prefix $key) (eq $prefix "")) "table" $value) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "herald.toml" -}}
{{- $config := include "herald.configDict" . | fromJson }}
# herald configuration, rendered by the herald Helm chart from its values.
# Secrets are not here: they come from environment variables fed by a Secret.
{{- range $section := list "server" "auth" "broker" "ping" "shutdown" "limits" "log" }}
{{- with index $config $section }}
{{ include "herald.tomlTable" (dict "prefix" $section "table" .) }}
{{- end }}
{{- end }}
{{- range $config.channels }}

[[channels]]
{{- range $key, $value := . }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- end }}
{{ end }}

{{/*
The container's environment: herald's secrets as HERALD_<SECTION>__<KEY>
variables from the Secret, then extraEnv. Keys that herald can do without
are optional, so an existingSecret need not hold them.
*/}}
{{- define "herald.env" -}}
{{- $secretName := include "herald.secretName" . }}
{{- $existing := .Values.secrets.existingSecret }}
{{- $kind := .Values.config.broker.kind }}
{{- if and (include "herald.usesHmac" .) (or $existing .Values.secrets.hmacSecret) }}
- name: HERALD_AUTH__HMAC_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ .Values.secrets.keys.hmacSecret }}
{{- end }}
{{- if or $existing .Values.secrets.apiKey }}
- name: HERALD_API__KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ .Values.secrets.keys.apiKey }}
      optional: true
{{- end }}
{{- if eq $kind "redis" }}
- name: HERALD_BROKER__URL
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ .Values.secrets.keys.brokerUrl }}
{{- else if eq $kind "redis-cluster" }}
- name: HERALD_BROKER__CLUSTER_URLS
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ .Values.secrets.keys.brokerClusterUrls }}
{{- else if eq $kind "redis-sentinel" }}
{{- if or $existing .Values.secrets.brokerPassword }}
- name: HERALD_BROKER__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ .Values.secrets.keys.brokerPassword }}
      optional: true
{{- end }}
{{- if or $existing .Values.secrets.sentinelPassword }}
- name: HERALD_BROKER__SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ .Values.secrets.keys.sentinelPassword }}
      optional: true
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
