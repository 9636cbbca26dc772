"""cluster.yaml must validate against the cluster-launcher schema shipped inside Ray."""

import json
import os

import jsonschema
import ray
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_validates_against_ray_schema():
    schema = json.load(open(os.path.join(os.path.dirname(ray.__file__), "autoscaler",
                                         "ray-schema.json")))
    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types["head"]["resources"] == {"CPU": 0}
    assert any("install" in c and "-e ." in c for c in cfg["setup_commands"])


def test_schema_rejects_a_broken_config():
    schema = json.load(open(os.path.join(os.path.dirname(ray.__file__), "autoscaler",
                                         "ray-schema.json")))
    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    cfg["max_workers"] = "many"
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("schema accepted max_workers='many'")
