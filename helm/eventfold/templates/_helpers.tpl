{{/* The release's resource name prefix. */}}
{{- define "eventfold.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "eventfold.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "query"). */}}
{{- define "eventfold.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eventfold.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The Secret holding the database URL, and its key. */}}
{{- define "eventfold.databaseSecret" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- printf "%s-database" (include "eventfold.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "eventfold.databaseSecretKey" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/* Whether the chart runs its own Schema Registry (it needs Kafka). */}}
{{- define "eventfold.ownRegistry" -}}
{{- if and .Values.schemaRegistry.enabled .Values.kafka.brokers -}}true{{- end -}}
{{- end -}}

{{/* The Schema Registry URL: the chart's own, else schemaRegistry.url. */}}
{{- define "eventfold.registryUrl" -}}
{{- if include "eventfold.ownRegistry" . -}}
{{- printf "http://%s-schema-registry:8081" (include "eventfold.fullname" .) -}}
{{- else -}}
{{- .Values.schemaRegistry.url -}}
{{- end -}}
{{- end -}}

{{/* Whether the event bus is configured: brokers and a registry. */}}
{{- define "eventfold.bus" -}}
{{- if and .Values.kafka.brokers (include "eventfold.registryUrl" .) -}}true{{- end -}}
{{- end -}}

{{/* Fails the render early on settings that cannot work. */}}
{{- define "eventfold.validate" -}}
{{- if not (or .Values.database.url .Values.database.existingSecret) -}}
{{- fail "database.url or database.existingSecret is required: the PostgreSQL holding the event store" -}}
{{- end -}}
{{- if and .Values.relay.enabled .Values.kafka.brokers (not (include "eventfold.registryUrl" .)) -}}
{{- fail "relay.enabled needs a Schema Registry: schemaRegistry.enabled=true or schemaRegistry.url" -}}
{{- end -}}
{{- if not (has .Values.projector.source (list "auto" "kafka" "log")) -}}
{{- fail (printf "projector.source must be auto, kafka or log, not %q" .Values.projector.source) -}}
{{- end -}}
{{- if and (eq .Values.projector.source "kafka") .Values.projector.enabled (not (include "eventfold.bus" .)) -}}
{{- fail "projector.source=kafka needs kafka.brokers and a Schema Registry (or projector.source=log)" -}}
{{- end -}}
{{- end -}}

{{/* Where the projectors read: auto is kafka with the event bus, else log. */}}
{{- define "eventfold.projectorSource" -}}
{{- if eq .Values.projector.source "auto" -}}
{{- if include "eventfold.bus" . -}}kafka{{- else -}}log{{- end -}}
{{- else -}}
{{- .Values.projector.source -}}
{{- end -}}
{{- end -}}

{{/* Environment every eventfold container shares. */}}
{{- define "eventfold.env" -}}
- name: EVENTFOLD_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "eventfold.databaseSecret" . }}
      key: {{ include "eventfold.databaseSecretKey" . }}
- name: EVENTFOLD_LOG__FORMAT
  value: {{ .Values.log.format | quote }}
- name: EVENTFOLD_LOG__FILTER
  value: {{ .Values.log.filter | quote }}
{{- if .Values.kafka.brokers }}
- name: EVENTFOLD_RELAY__BROKERS
  value: {{ .Values.kafka.brokers | toJson | quote }}
{{- end }}
{{- with include "eventfold.registryUrl" . }}
- name: EVENTFOLD_REGISTRY__URL
  value: {{ . | quote }}
{{- end }}
{{- if .Values.redis.url }}
- name: EVENTFOLD_QUERY__CACHE__URL
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- include "eventfold.tracingEnv" . }}
{{- include "eventfold.tlsEnv" . }}
{{- end -}}

{{/* Span export of every eventfold container (tracing.otlpEndpoint). */}}
{{- define "eventfold.tracingEnv" -}}
{{- with .Values.tracing.otlpEndpoint }}
- name: EVENTFOLD_TRACING__OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: EVENTFOLD_TRACING__SAMPLING_RATIO
  value: {{ .Values.tracing.samplingRatio | quote }}
{{- end -}}

{{/* [tls] from the Secret tls.existingSecret, mounted by eventfold.tlsMount. */}}
{{- define "eventfold.tlsEnv" -}}
{{- if .Values.tls.existingSecret }}
- name: EVENTFOLD_TLS__CERT_FILE
  value: /etc/eventfold/tls/tls.crt
- name: EVENTFOLD_TLS__KEY_FILE
  value: /etc/eventfold/tls/tls.key
- name: EVENTFOLD_TLS__CA_FILE
  value: /etc/eventfold/tls/ca.crt
{{- if .Values.tls.mutual }}
- name: EVENTFOLD_TLS__CLIENT_CA_FILE
  value: /etc/eventfold/tls/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* The container's mount of the TLS Secret, when there is one. */}}
{{- define "eventfold.tlsMount" -}}
{{- if .Values.tls.existingSecret }}
volumeMounts:
  - name: tls
    mountPath: /etc/eventfold/tls
    readOnly: true
{{- end }}
{{- end -}}

{{/* The scheme of the gRPC servers' URLs. */}}
{{- define "eventfold.grpcScheme" -}}
{{- if .Values.tls.existingSecret -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* Pod settings every eventfold pod shares. */}}
{{- define "eventfold.podSpec" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- if .Values.tls.existingSecret }}
volumes:
  - name: tls
    secret:
      secretName: {{ .Values.tls.existingSecret }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The annotations of an eventfold pod whose admin listener is on
.port: Prometheus' scrape annotations (metrics.scrapeAnnotations), then
podAnnotations (which win). */}}
{{- define "eventfold.podAnnotations" -}}
{{- $root := .root -}}
{{- $annotations := dict -}}
{{- if $root.Values.metrics.scrapeAnnotations -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .port) -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- $annotations = merge (deepCopy ($root.Values.podAnnotations | default dict)) $annotations -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The admin listener of an eventfold container: its env var. */}}
{{- define "eventfold.adminEnv" -}}
- name: EVENTFOLD_ADMIN__LISTEN
  value: "0.0.0.0:{{ .Values.admin.port }}"
{{- end -}}

{{/* Probes of a worker (no gRPC port) on its admin listener. */}}
{{- define "eventfold.adminProbes" -}}
ports:
  - name: admin
    containerPort: {{ .Values.admin.port }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /readyz
    port: admin
  periodSeconds: 2
  failureThreshold: 60
readinessProbe:
  httpGet:
    path: /readyz
    port: admin
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /healthz
    port: admin
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}
