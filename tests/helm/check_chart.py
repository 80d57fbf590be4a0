#!/usr/bin/env python3
"""Checks helm/eventfold offline: `helm lint --strict`, renders for several
value sets, validates every manifest against Kubernetes 1.30's schemas and
checks what the chart promises (probes on the gRPC ports, hooks in order,
the Schema Registry on Kafka, one relay, services that select their pods).

    tests/helm/check_chart.py helm/eventfold

Run by tests/run in a virtualenv of tests/helm/requirements.txt.
"""

import json
import sys

import kubernetes_validate
import yaml
from helm_python import Chart, HelmError, lint

KUBE_VERSION = "1.30.0"
RELEASE = "rel"
PREFIX = "rel-eventfold"
DB = {"database": {"url": "postgresql://eventfold@pg:5432/eventfold"}}
BROKERS = ["kafka-0.kafka:9092", "kafka-1.kafka:9092"]
BUS = {**DB, "kafka": {"brokers": BROKERS}, "redis": {"url": "redis://redis:6379"}}
SERVERS = {"eventstore": 50051, "command": 50052, "query": 50053, "saga": 50054}

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def render(chart_dir, values):
    """Every manifest the chart renders for `values`, validated."""
    chart = Chart.load(chart_dir)
    out = chart.render(values=values, name=RELEASE, namespace="ns", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                # Prometheus Operator kinds are CRDs: checked by check_monitoring.
                if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                    docs.append(doc)
                    continue
                try:
                    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    failures.append(f"{path}: {doc['kind']} {doc['metadata']['name']}: {e}")
                docs.append(doc)
    return docs


def render_fails(chart_dir, values, expected):
    try:
        render(chart_dir, values)
    except HelmError as e:
        check(expected in str(e), f"render of {values} failed, but not saying {expected!r}: {e}")
        return
    failures.append(f"render of {values} should fail with {expected!r}")


def find(docs, kind, name):
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return matches[0] if matches else None


def names(docs, kind):
    return sorted(d["metadata"]["name"] for d in docs if d["kind"] == kind)


def container(workload):
    spec = workload["spec"]["template"]["spec"]
    return spec["containers"][0]


def env(workload):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(workload).get("env", [])}


def check_full(docs):
    deployments = {f"{PREFIX}-{c}" for c in [*SERVERS, "gateway", "projector", "relay", "schema-registry"]}
    check(set(names(docs, "Deployment")) == deployments, f"deployments: {names(docs, 'Deployment')}")

    # Hooks: the Secret, then the migrations before install/upgrade; the
    # schemas after.
    secret = find(docs, "Secret", f"{PREFIX}-database")
    migrate = find(docs, "Job", f"{PREFIX}-migrate")
    register = find(docs, "Job", f"{PREFIX}-register-schemas")
    check(secret and secret["stringData"]["url"] == DB["database"]["url"], "the Secret holds the database URL")
    check(migrate is not None and register is not None, "both jobs are rendered")
    if secret and migrate and register:
        hook = lambda d, key: d["metadata"]["annotations"][f"helm.sh/hook{key}"]
        check(hook(migrate, "") == "pre-install,pre-upgrade", "migrations run before install and upgrade")
        check(int(hook(secret, "-weight")) < int(hook(migrate, "-weight")), "the Secret exists before the migrations")
        check(container(migrate)["args"] == ["migrate", "up"], "the migrations job runs `migrate up`")
        check(hook(register, "") == "post-install,post-upgrade", "schemas are registered after install/upgrade")
        check(
            container(register)["args"]
            == ["schemas", "register", "--registry-url", f"http://{PREFIX}-schema-registry:8081"],
            f"schema registration: {container(register)['args']}",
        )

    # Every eventfold container reads the URL from the Secret.
    for d in docs:
        if d["kind"] in ("Deployment", "Job") and "eventfold:" in container(d)["image"]:
            if d["metadata"]["name"].endswith(("register-schemas", "gateway")):
                continue
            ref = env(d).get("EVENTFOLD_DATABASE__URL")
            check(
                ref == {"secretKeyRef": {"name": f"{PREFIX}-database", "key": "url"}},
                f"{d['metadata']['name']}: database URL from the Secret ({ref})",
            )

    # The gRPC servers: listen on their port, probed with grpc.health.v1,
    # behind a Service that selects exactly their pods.
    for component, port in SERVERS.items():
        name = f"{PREFIX}-{component}"
        deployment, service = find(docs, "Deployment", name), find(docs, "Service", name)
        if not (deployment and service):
            failures.append(f"{component}: deployment and service")
            continue
        c = container(deployment)
        check(c["args"] == ["serve", component], f"{component}: {c['args']}")
        check(env(deployment)[f"EVENTFOLD_{component.upper()}__LISTEN"] == f"0.0.0.0:{port}", f"{component} listen")
        check(c["ports"][0]["containerPort"] == port, f"{component}: container port")
        for probe in ("startupProbe", "readinessProbe"):
            check(c.get(probe, {}).get("grpc", {}).get("port") == port, f"{component}: {probe} is grpc on {port}")
        check(
            c["livenessProbe"].get("httpGet") == {"path": "/healthz", "port": "admin"},
            f"{component}: liveness on the admin listener's /healthz",
        )
        check(env(deployment)["EVENTFOLD_ADMIN__LISTEN"] == "0.0.0.0:9464", f"{component}: admin listener")
        check(service["spec"]["ports"][0]["port"] == port, f"{component}: service port")
        pods = deployment["spec"]["template"]["metadata"]["labels"]
        selector = service["spec"]["selector"]
        check(selector.items() <= pods.items(), f"{component}: the service selects its pods")
        selected = [
            d["metadata"]["name"]
            for d in docs
            if d["kind"] == "Deployment" and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        check(selected == [name], f"{component}: the service selects only its pods ({selected})")
        pdb = find(docs, "PodDisruptionBudget", name)
        check(pdb and pdb["spec"]["selector"]["matchLabels"].items() <= pods.items(), f"{component}: PDB")
        hpa = find(docs, "HorizontalPodAutoscaler", name)
        if component in ("eventstore", "saga"):
            check(hpa is None and deployment["spec"]["replicas"] == 2, f"{component}: 2 replicas, no autoscaler")
        else:
            check(hpa and hpa["spec"]["scaleTargetRef"]["name"] == name, f"{component}: autoscaled")
            check("replicas" not in deployment["spec"], f"{component}: replicas left to the autoscaler")

    # The REST gateway: in front of every server, one upstream per package,
    # probed on its admin port, behind a Service of its own.
    gateway = find(docs, "Deployment", f"{PREFIX}-gateway")
    if gateway:
        c = container(gateway)
        check(c["args"] == ["serve", "gateway"], f"gateway: {c['args']}")
        check(env(gateway)["EVENTFOLD_GATEWAY__LISTEN"] == "0.0.0.0:8080", "gateway listen")
        upstreams = {k: v for k, v in env(gateway).items() if k.startswith("EVENTFOLD_GATEWAY__UPSTREAMS__")}
        expected = {
            "EVENTSTORE": "eventstore", "ADMIN": "eventstore", "ORDERS": "command", "INVENTORY": "command", "PAYMENTS": "command",
            "SHIPPING": "command", "ACCOUNTS": "command", "USERS": "command", "QUERY": "query", "SAGAS": "saga",
        }
        check(
            upstreams == {
                f"EVENTFOLD_GATEWAY__UPSTREAMS__{k}": f"http://{PREFIX}-{v}:{SERVERS[v]}" for k, v in expected.items()
            },
            f"gateway upstreams: {upstreams}",
        )
        check("EVENTFOLD_DATABASE__URL" not in env(gateway), "the gateway does not get the database")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "gateway readiness on the admin port")
        service = find(docs, "Service", f"{PREFIX}-gateway")
        check(service and service["spec"]["ports"][0]["port"] == 8080, "gateway service on 8080")
        check(find(docs, "Ingress", f"{PREFIX}-gateway") is None, "no Ingress unless enabled")
    else:
        failures.append("the gateway is rendered")

    # The bus: one relay, Kafka-fed projectors, the registry on Kafka.
    registry_url = f"http://{PREFIX}-schema-registry:8081"
    relay = find(docs, "Deployment", f"{PREFIX}-relay")
    if relay:
        check(relay["spec"]["replicas"] == 1 and relay["spec"]["strategy"]["type"] == "Recreate", "one relay")
        check(json.loads(env(relay)["EVENTFOLD_RELAY__BROKERS"]) == BROKERS, "relay brokers")
        check(env(relay)["EVENTFOLD_REGISTRY__URL"] == registry_url, "relay registry")
    # The workers: probed on their admin listener.
    for worker in (relay, find(docs, "Deployment", f"{PREFIX}-projector")):
        if not worker:
            failures.append("the projector and the relay are rendered")
            continue
        name, c = worker["metadata"]["name"], container(worker)
        check(env(worker)["EVENTFOLD_ADMIN__LISTEN"] == "0.0.0.0:9464", f"{name}: admin listener")
        check({"name": "admin", "containerPort": 9464, "protocol": "TCP"} in c["ports"], f"{name}: admin port")
        for probe in ("startupProbe", "readinessProbe"):
            check(c[probe]["httpGet"] == {"path": "/readyz", "port": "admin"}, f"{name}: {probe} on /readyz")
        check(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, f"{name}: liveness")

    # Every eventfold pod carries Prometheus' scrape annotations for the
    # port its admin listener has.
    for d in docs:
        if d["kind"] != "Deployment" or "eventfold:" not in container(d)["image"]:
            continue
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        admin = [p["containerPort"] for p in container(d)["ports"] if p["name"] == "admin"]
        check(
            annotations.get("prometheus.io/scrape") == "true"
            and annotations.get("prometheus.io/path") == "/metrics"
            and [int(annotations.get("prometheus.io/port", 0))] == admin,
            f"{d['metadata']['name']}: scrape annotations for its admin port {admin}: {annotations}",
        )
    check(not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")], "no PodMonitor unless asked")
    check(
        not any("EVENTFOLD_TRACING__OTLP_ENDPOINT" in env(d) for d in docs if d["kind"] == "Deployment"),
        "no span export unless tracing.otlpEndpoint is set",
    )

    projector = find(docs, "Deployment", f"{PREFIX}-projector")
    if projector:
        check(env(projector)["EVENTFOLD_PROJECTOR__SOURCE"] == "kafka", "projectors read Kafka")
        check(env(projector)["EVENTFOLD_QUERY__CACHE__URL"] == "redis://redis:6379", "projectors invalidate Redis")
    registry = find(docs, "Deployment", f"{PREFIX}-schema-registry")
    if registry:
        c = container(registry)
        check(c["image"].startswith("confluentinc/cp-schema-registry:"), f"the real registry image ({c['image']})")
        bootstrap = env(registry)["SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS"]
        check(bootstrap == ",".join(f"PLAINTEXT://{b}" for b in BROKERS), f"registry bootstrap: {bootstrap}")
        check(c["readinessProbe"]["httpGet"]["path"] == "/subjects", "registry readiness")
        service = find(docs, "Service", f"{PREFIX}-schema-registry")
        check(service and service["spec"]["ports"][0]["port"] == 8081, "registry service on 8081")


def check_monitoring(chart_dir):
    """The PodMonitor, the PrometheusRule and the dashboard ConfigMap, when
    enabled; podAnnotations beside (and over) the scrape annotations."""
    values = {
        **BUS,
        "podAnnotations": {"team": "orders", "prometheus.io/path": "/custom"},
        "metrics": {
            "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
            "prometheusRule": {"enabled": True},
            "dashboard": {"enabled": True},
        },
    }
    docs = render(chart_dir, values)
    monitor = find(docs, "PodMonitor", PREFIX)
    if monitor:
        spec = monitor["spec"]
        check(monitor["metadata"]["labels"].get("release") == "kube-prometheus", "PodMonitor labels")
        check(spec["podMetricsEndpoints"][0]["port"] == "admin", "PodMonitor scrapes the admin port")
        check(spec["podMetricsEndpoints"][0]["path"] == "/metrics", "PodMonitor path")
        selected = []
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            labels = d["spec"]["template"]["metadata"]["labels"]
            match = spec["selector"]["matchLabels"].items() <= labels.items() and all(
                labels.get(e["key"]) in e["values"] for e in spec["selector"]["matchExpressions"]
            )
            if match:
                selected.append(d["metadata"]["name"])
                check(
                    any(p["name"] == "admin" for p in container(d)["ports"]),
                    f"{d['metadata']['name']}: selected by the PodMonitor, has an admin port",
                )
        expected = sorted(f"{PREFIX}-{c}" for c in [*SERVERS, "gateway", "projector", "relay"])
        check(sorted(selected) == expected, f"PodMonitor selects every eventfold pod: {selected}")
    else:
        failures.append("metrics.podMonitor.enabled renders a PodMonitor")
    rule = find(docs, "PrometheusRule", PREFIX)
    with open(f"{chart_dir}/files/prometheus-alerts.yml") as f:
        alerts = yaml.safe_load(f)
    check(rule and rule["spec"] == alerts, "the PrometheusRule holds files/prometheus-alerts.yml")
    dashboard = find(docs, "ConfigMap", f"{PREFIX}-dashboard")
    with open(f"{chart_dir}/files/grafana-dashboard.json") as f:
        expected_dashboard = json.load(f)
    check(
        dashboard
        and dashboard["metadata"]["labels"].get("grafana_dashboard") == "1"
        and json.loads(dashboard["data"]["eventfold.json"]) == expected_dashboard,
        "the dashboard ConfigMap holds files/grafana-dashboard.json",
    )
    command = find(docs, "Deployment", f"{PREFIX}-command")
    annotations = command["spec"]["template"]["metadata"]["annotations"]
    check(
        annotations.get("team") == "orders" and annotations.get("prometheus.io/path") == "/custom",
        f"podAnnotations kept and winning: {annotations}",
    )
    # Span export: every eventfold container, the gateway included.
    docs = render(chart_dir, {**BUS, "tracing": {"otlpEndpoint": "http://collector:4317", "samplingRatio": 0.25}})
    for d in docs:
        if d["kind"] == "Deployment" and "eventfold:" in container(d)["image"]:
            check(
                env(d).get("EVENTFOLD_TRACING__OTLP_ENDPOINT") == "http://collector:4317"
                and env(d).get("EVENTFOLD_TRACING__SAMPLING_RATIO") == "0.25",
                f"{d['metadata']['name']}: spans exported to tracing.otlpEndpoint",
            )
    docs = render(chart_dir, {**DB, "metrics": {"scrapeAnnotations": False}})
    command = find(docs, "Deployment", f"{PREFIX}-command")
    check(
        "annotations" not in command["spec"]["template"]["metadata"],
        "metrics.scrapeAnnotations=false: no annotations",
    )


def main():
    chart_dir = sys.argv[1] if len(sys.argv) > 1 else "helm/eventfold"
    result = lint(chart_dir, BUS, strict=True, kube_version=f"v{KUBE_VERSION}")
    check(not result["errors"], f"helm lint --strict: {result['errors']}")
    for message in result["messages"]:
        print(f"lint: {message['path']}: {message['error']}")
    check(result["total_charts_linted"] == 1, f"linted: {result}")

    check_full(render(chart_dir, BUS))

    # Without Kafka: no bus, projectors on the log.
    docs = render(chart_dir, DB)
    check(find(docs, "Deployment", f"{PREFIX}-relay") is None, "no relay without Kafka")
    check(find(docs, "Deployment", f"{PREFIX}-schema-registry") is None, "no registry without Kafka")
    check(find(docs, "Job", f"{PREFIX}-register-schemas") is None, "no schema registration without a registry")
    projector = find(docs, "Deployment", f"{PREFIX}-projector")
    check(projector and env(projector)["EVENTFOLD_PROJECTOR__SOURCE"] == "log", "projectors on the log")

    # A registry run elsewhere, and a database Secret of the user's.
    external = {
        "database": {"existingSecret": "pg", "existingSecretKey": "dsn"},
        "kafka": {"brokers": BROKERS},
        "schemaRegistry": {"enabled": False, "url": "http://registry.example:8081"},
    }
    docs = render(chart_dir, external)
    check(find(docs, "Deployment", f"{PREFIX}-schema-registry") is None, "no own registry when disabled")
    check(not names(docs, "Secret"), "no Secret with existingSecret")
    relay = find(docs, "Deployment", f"{PREFIX}-relay")
    check(relay and env(relay)["EVENTFOLD_REGISTRY__URL"] == "http://registry.example:8081", "external registry")
    check(
        relay and env(relay)["EVENTFOLD_DATABASE__URL"] == {"secretKeyRef": {"name": "pg", "key": "dsn"}},
        "the user's Secret",
    )

    # The gateway's Ingress, when asked for.
    docs = render(
        chart_dir,
        {**DB, "gateway": {"ingress": {"enabled": True, "host": "api.example", "className": "nginx"}}},
    )
    ingress = find(docs, "Ingress", f"{PREFIX}-gateway")
    check(ingress and ingress["spec"]["rules"][0]["host"] == "api.example", "gateway Ingress host")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] if ingress else {}
    check(backend == {"name": f"{PREFIX}-gateway", "port": {"name": "http"}}, f"gateway Ingress backend: {backend}")

    # TLS from a Secret: every eventfold container mounts it and has [tls];
    # mutual TLS by default; the gateway calls https:// upstreams; the gRPC
    # servers are probed on the admin listener (gRPC probes speak no TLS).
    docs = render(chart_dir, {**DB, "tls": {"existingSecret": "eventfold-tls"}})
    workloads = [d for d in docs if d["kind"] in ("Deployment", "Job")]
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        if "EVENTFOLD_TLS__CERT_FILE" not in env(workload):
            check(name.endswith("register-schemas"), f"{name}: [tls] set")
            continue
        check(
            {"name": "tls", "secret": {"secretName": "eventfold-tls"}} in pod.get("volumes", []),
            f"{name}: the TLS Secret as a volume",
        )
        mounts = container(workload).get("volumeMounts", [])
        check(
            {"name": "tls", "mountPath": "/etc/eventfold/tls", "readOnly": True} in mounts,
            f"{name}: the TLS Secret mounted: {mounts}",
        )
        check(env(workload)["EVENTFOLD_TLS__KEY_FILE"] == "/etc/eventfold/tls/tls.key", f"{name}: key file")
        check(env(workload).get("EVENTFOLD_TLS__CLIENT_CA_FILE") == "/etc/eventfold/tls/ca.crt", f"{name}: mutual")
    gateway = find(docs, "Deployment", f"{PREFIX}-gateway")
    upstreams = {k: v for k, v in env(gateway).items() if k.startswith("EVENTFOLD_GATEWAY__UPSTREAMS__")}
    check(upstreams and all(v.startswith("https://") for v in upstreams.values()), f"https upstreams: {upstreams}")
    command = find(docs, "Deployment", f"{PREFIX}-command")
    probe = container(command)["readinessProbe"]
    check(probe.get("httpGet") == {"path": "/readyz", "port": "admin"}, f"probe over the admin listener: {probe}")
    check(env(command)["EVENTFOLD_ADMIN__LISTEN"] == "0.0.0.0:9464", "the admin listener of a gRPC server")
    plain = render(chart_dir, DB)
    check("grpc" in container(find(plain, "Deployment", f"{PREFIX}-command"))["readinessProbe"], "gRPC probes without TLS")
    check(
        not any("EVENTFOLD_TLS__CERT_FILE" in env(d) for d in plain if d["kind"] in ("Deployment", "Job")),
        "no [tls] without a Secret",
    )
    docs = render(chart_dir, {**DB, "tls": {"existingSecret": "eventfold-tls", "mutual": False}})
    check(
        "EVENTFOLD_TLS__CLIENT_CA_FILE" not in env(find(docs, "Deployment", f"{PREFIX}-command")),
        "tls.mutual=false: no client CA",
    )

    check_monitoring(chart_dir)

    # Settings that cannot work fail the render and say why.
    render_fails(chart_dir, {}, "database.url or database.existingSecret is required")
    render_fails(chart_dir, {**DB, "projector": {"source": "kafka"}}, "projector.source=kafka needs kafka.brokers")
    render_fails(chart_dir, {**DB, "projector": {"source": "stream"}}, "projector.source must be")
    render_fails(
        chart_dir,
        {**DB, "kafka": {"brokers": BROKERS}, "schemaRegistry": {"enabled": False}},
        "relay.enabled needs a Schema Registry",
    )

    if failures:
        for failure in failures:
            print(f"FAIL: {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"{chart_dir}: lint, render and {KUBE_VERSION} validation passed; every check held")


if __name__ == "__main__":
    main()
