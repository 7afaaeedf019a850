"""deploy/: serve.yaml and the KubeRay RayService are valid Serve configs, hold the same
application, and name only arguments that build_app accepts; the compose example imports."""
from __future__ import annotations

import importlib.util
import os

import pytest
import yaml

from raylm.engine.config import EngineArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_ARGS = {"num_groups", "served_model_name", "api_key", "max_n", "max_queued_requests",
            "api_server_count", "autoscaling_config", "http_host", "http_port", "step_timeout",
            "queue_timeout", "max_redispatches"}
SERVICER = "raylm.cluster.raylm_pb2_grpc.add_GenerateServicer_to_server"


def _load(*parts):
    with open(os.path.join(ROOT, "deploy", *parts)) as f:
        return list(yaml.safe_load_all(f))


@pytest.fixture(scope="module")
def serve_config():
    (config,) = _load("serve.yaml")
    return config


@pytest.fixture(scope="module")
def kuberay():
    docs = {d["kind"]: d for d in _load("kuberay", "rayservice.yaml")}
    return docs["RayService"], docs["Service"], yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])


def test_configs_parse_as_serve_deploy_schema(serve_config, kuberay):
    from ray.serve.schema import ServeDeploySchema

    for config in (serve_config, kuberay[2]):
        schema = ServeDeploySchema.parse_obj(config)
        assert [app.name for app in schema.applications] == ["raylm"]
        assert schema.grpc_options.grpc_servicer_functions == [SERVICER]


def test_serve_yaml_is_what_the_brief_says(serve_config):
    assert serve_config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert serve_config["grpc_options"] == {"port": 9000, "grpc_servicer_functions": [SERVICER]}
    (app,) = serve_config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("raylm", "/", "raylm.cluster.app:build_app")
    assert app["args"]["model"] is None and app["args"]["api_key"] is None


def test_args_are_build_app_arguments(serve_config):
    args = serve_config["applications"][0]["args"]
    assert set(args) <= set(EngineArgs.field_names()) | APP_ARGS
    EngineArgs(**{k: v for k, v in args.items() if k not in APP_ARGS})  # valid values too
    from raylm.cluster.app import build_app

    build_app(dict(args))  # binds only: no model is loaded


def test_rayservice_matches_serve_yaml(serve_config, kuberay):
    rayservice, grpc_service, config = kuberay
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert config["applications"] == serve_config["applications"]
    assert config["grpc_options"] == serve_config["grpc_options"]
    assert config["http_options"] == {"host": "0.0.0.0", "port": serve_config["http_options"]["port"]}

    spec = rayservice["spec"]
    assert spec["serveService"]["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in spec["serveService"]["spec"]["ports"]] == [config["http_options"]["port"]]
    assert grpc_service["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in grpc_service["spec"]["ports"]] == [config["grpc_options"]["port"]]
    assert grpc_service["spec"]["selector"]["ray.io/originated-from-cr-name"] == rayservice["metadata"]["name"]

    cluster = spec["rayClusterConfig"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports["serve"] == 8000 and head_ports["grpc"] == 9000
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
            gpus += int(c["resources"]["limits"]["nvidia.com/gpu"]) * group["replicas"]
    args = config["applications"][0]["args"]
    assert gpus >= args["tensor_parallel_size"] * args["num_groups"]


def test_compose_example_imports():
    path = os.path.join(ROOT, "deploy", "examples", "compose_app.py")
    spec = importlib.util.spec_from_file_location("compose_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from ray.serve import Application

    assert isinstance(module.app, Application)
    routes = set(module.api.openapi()["paths"])
    assert {"/summarize", "/summarize/stream"} <= routes
