{{- define "guard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "guard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "guard.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "guard.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "guard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "guard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "guard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret the GUARD_* secret variables come from: an existing one, or the chart's own if any value is set. */}}
{{- define "guard.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if or .Values.secrets.apiKeys .Values.secrets.registryKey .Values.secrets.redisUrl .Values.secrets.metricsKey .Values.secrets.adminKey }}
{{- include "guard.fullname" . }}
{{- end }}
{{- end }}

{{- define "guard.container" -}}
name: guard
image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if .Values.app.nativeSidecar }}
restartPolicy: Always
{{- end }}
ports:
  - name: http
    containerPort: {{ .Values.guard.port }}
    protocol: TCP
env:
  - {name: HOME, value: /tmp}  # the root filesystem is read-only
  - {name: GUARD_HOST, value: "0.0.0.0"}
  - {name: GUARD_PORT, value: {{ .Values.guard.port | quote }}}
  - {name: GUARD_THREADS, value: {{ .Values.guard.threads | quote }}}
  - {name: GUARD_DTYPE, value: {{ .Values.guard.dtype | quote }}}
  - {name: GUARD_COMPILE, value: {{ .Values.guard.compile | quote }}}
  - {name: GUARD_COMPILE_IN_BACKGROUND, value: {{ .Values.guard.compileInBackground | quote }}}
  - {name: GUARD_MAX_BATCH, value: {{ .Values.guard.maxBatch | quote }}}
  - {name: GUARD_MAX_WAITING, value: {{ .Values.guard.maxWaiting | quote }}}
  - {name: GUARD_DEFAULT_MAX_TOKENS, value: {{ .Values.guard.defaultMaxTokens | quote }}}
  - {name: GUARD_CONTEXT_WINDOW, value: {{ .Values.guard.contextWindow | quote }}}
  - {name: GUARD_RELOAD_INTERVAL, value: {{ .Values.guard.reloadInterval | quote }}}
  - {name: GUARD_CAPTURE, value: {{ .Values.guard.capture | quote }}}
  - {name: GUARD_CAPTURE_REDACT, value: {{ .Values.guard.captureRedact | quote }}}
  - {name: GUARD_CAPTURE_SAMPLE, value: {{ .Values.guard.captureSample | quote }}}
  {{- if .Values.policies }}
  - {name: GUARD_POLICY_FILE, value: /etc/guard/policies.yaml}
  {{- end }}
  {{- $secret := include "guard.secretName" . }}
  {{- if $secret }}
  {{- range $var, $key := dict "GUARD_API_KEYS" "api-keys" "GUARD_REGISTRY_KEY" "registry-key" "GUARD_REDIS_URL" "redis-url" "GUARD_METRICS_KEY" "metrics-key" "GUARD_ADMIN_KEY" "admin-key" }}
  - name: {{ $var }}
    valueFrom: {secretKeyRef: {name: {{ $secret }}, key: {{ $key }}, optional: true}}
  {{- end }}
  {{- end }}
  {{- with .Values.guard.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.startupProbe }}
startupProbe: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.readinessProbe }}
readinessProbe: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.livenessProbe }}
livenessProbe: {{- toYaml . | nindent 2 }}
{{- end }}
resources: {{- toYaml .Values.resources | nindent 2 }}
securityContext: {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - {name: state, mountPath: /opt/guard/cache/registry-last-known-good, subPath: registry-last-known-good}
  - {name: state, mountPath: /tmp, subPath: tmp}
  - {name: state, mountPath: /opt/guard/cache/inductor, subPath: inductor}
  {{- if .Values.policies }}
  - {name: policies, mountPath: /etc/guard, readOnly: true}
  {{- end }}
{{- end }}
