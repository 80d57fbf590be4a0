#!/usr/bin/env python3
"""Checks docker-compose.yml offline: valid against the Compose
specification's JSON schema (check-jsonschema's pinned copy), and what the
file promises: one image for every eventfold service (one build), a health
check on every long-running service, `depends_on` with conditions only (no
restart loops), every service that needs the database after the migration
job, Prometheus scraping every eventfold process, its rules and Grafana's
dashboard mounted from the Helm chart's files.

    tests/compose/check_compose.py docker-compose.yml

Run by tests/run with the API checker's virtualenv (tests/api/requirements.txt).
"""

import subprocess
import sys
from pathlib import Path

import yaml

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def main():
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docker-compose.yml")
    root = path.resolve().parent
    schema = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )
    check(schema.returncode == 0, f"Compose schema: {schema.stdout}{schema.stderr}")

    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    eventfold = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("eventfold")}
    check(len(eventfold) >= 9, f"eventfold services: {sorted(eventfold)}")
    builds = [n for n, s in services.items() if "build" in s]
    check(builds == ["migrate"], f"one build (migrate), the others run its image: {builds}")
    check(len({s["image"] for s in eventfold.values()}) == 1, "one image tag for every eventfold service")
    one_shot = {"migrate", "register-schemas"}

    for name, service in services.items():
        check("restart" not in service, f"{name}: no restart loop (depends_on conditions instead)")
        depends = service.get("depends_on", {})
        check(isinstance(depends, dict), f"{name}: depends_on with conditions, not a list")
        for dependency, rule in (depends.items() if isinstance(depends, dict) else []):
            check(dependency in services, f"{name}: depends on unknown {dependency}")
            condition = rule.get("condition")
            if dependency in one_shot:
                check(condition == "service_completed_successfully", f"{name}: waits for {dependency} to finish")
            else:
                check(condition == "service_healthy", f"{name}: waits for {dependency} to be healthy ({condition})")
                target = services.get(dependency, {}).get("healthcheck", {})
                check(target and not target.get("disable"), f"{name}: {dependency} has a health check to wait for")
        health = service.get("healthcheck")
        if name in one_shot:
            continue
        check(health and not health.get("disable") and health.get("test"), f"{name}: a health check")

    # Every service with the database waits for the migrations (and they
    # for PostgreSQL).
    for name, service in services.items():
        environment = service.get("environment", {})
        if "EVENTFOLD_DATABASE__URL" in environment and name != "migrate":
            condition = service.get("depends_on", {}).get("migrate", {}).get("condition")
            check(condition == "service_completed_successfully", f"{name}: uses the database, depends on migrate")
    check(
        services["migrate"]["depends_on"].get("postgres", {}).get("condition") == "service_healthy",
        "migrate waits for PostgreSQL",
    )

    # Every long-running eventfold process: admin listener, probed by itself.
    admin = {}
    for name, service in eventfold.items():
        if name in one_shot:
            continue
        listen = service.get("environment", {}).get("EVENTFOLD_ADMIN__LISTEN", "")
        check(listen.startswith("0.0.0.0:"), f"{name}: admin listener on all interfaces ({listen})")
        admin[name] = listen.rsplit(":", 1)[-1]
        check(service["healthcheck"]["test"][:3] == ["CMD", "eventfold", "probe"], f"{name}: eventfold probe")
        endpoint = service.get("environment", {}).get("EVENTFOLD_TRACING__OTLP_ENDPOINT")
        check(endpoint == "http://jaeger:4317", f"{name}: spans to Jaeger ({endpoint})")

    # Prometheus scrapes each of them; its rules and Grafana's dashboard
    # come from the Helm chart's files.
    prometheus = services.get("prometheus", {})
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus.get("volumes", [])}
    config_path = root / mounts.get("/etc/prometheus/prometheus.yml", "missing")
    check(config_path.is_file(), f"Prometheus config mounted from {config_path}")
    check(
        mounts.get("/etc/prometheus/alerts.yml") == "./helm/eventfold/files/prometheus-alerts.yml",
        f"Prometheus rules from the chart: {mounts}",
    )
    if config_path.is_file():
        config = yaml.safe_load(config_path.read_text())
        targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
        expected = {f"{name}:{port}" for name, port in admin.items()}
        check(targets == expected, f"Prometheus scrapes every eventfold process: {sorted(targets)} vs {sorted(expected)}")
        check(config.get("rule_files") == ["alerts.yml"], "Prometheus loads the alert rules")
    grafana = services.get("grafana", {})
    grafana_mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana.get("volumes", [])}
    check(
        grafana_mounts.get("/var/lib/grafana/dashboards/eventfold.json") == "./helm/eventfold/files/grafana-dashboard.json",
        f"Grafana's dashboard from the chart: {grafana_mounts}",
    )
    provisioning = root / grafana_mounts.get("/etc/grafana/provisioning", "missing")
    check((provisioning / "datasources").is_dir() and (provisioning / "dashboards").is_dir(), "Grafana provisioning")
    check("jaeger" in services and "4317:4317" in services["jaeger"].get("ports", []), "Jaeger receives OTLP on 4317")

    if failures:
        for failure in failures:
            print(f"FAIL: {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"{path}: Compose schema valid; every check held ({len(services)} services)")


if __name__ == "__main__":
    main()
