"""Every YAML under conf/ is loaded the way its user loads it, and a typo'd key in any of them fails.

- training configs (conf/lm, asr, forecast, synthetic): parsed by ``bptt.config.parser.parse_config`` and
  instantiated (construction only: no ``prepare_data``, no download);
- sweep files (conf/sweep): ``load_sweep``, expanded into Ray Tune's search space, scheduler and
  search algorithm; one sample's trial arguments parse as a training config;
- cluster files (conf/cluster): the Ray cluster launcher's config against the JSON schema shipped
  in the installed ray (``ray/autoscaler/ray-schema.json``), a KubeRay RayJob against the fields
  of KubeRay's ``ray.io/v1`` API types (``RayJobSpec``, ``RayClusterSpec``, ``HeadGroupSpec``,
  ``WorkerGroupSpec`` in ray-operator/apis/ray/v1/) and the Kubernetes pod template fields it nests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PROJECT

CONF = PROJECT / "conf"
CONF_FILES = sorted(PROJECT.glob("conf/**/*.yaml"))
TRAINING_DIRS = ("lm", "asr", "forecast", "synthetic")


def _kind(path: Path) -> str:
    """training, sweep or cluster, by the folder under the nearest ``conf/`` (also of a copy)."""
    root = next(p for p in path.parents if p.name == "conf")
    folder = path.relative_to(root).parts[0]
    if folder in TRAINING_DIRS:
        return "training"
    if folder in ("sweep", "cluster"):
        return folder
    raise AssertionError(f"{path}: conf/{folder}/ is not a known kind of config; teach tests/test_conf_files.py")


def _id(path: Path) -> str:
    return path.relative_to(CONF).as_posix()


# --------------------------------------------------------------------------------------------------
# training configs


def _training_args(path: Path, tmp_path: Path) -> list[str]:
    """``--config PATH`` plus, for a text corpus, a stand-in vocabulary, so that configs whose corpus
    is not on this machine (tiny Shakespeare, WikiText-2 under ../shared/data) still build."""
    from bptt.datamodules.text_corpus import Vocabulary

    args = ["--config", str(path)]
    data = yaml.safe_load(path.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    if data == "TextStreamDataModule":
        vocab = tmp_path / "vocab.json"
        Vocabulary(["<unk>", "<eos>", "a", "b"], "word").save(vocab)
        args += ["--data.vocab_file", str(vocab)]
    return args


def check_training_config(path: Path, tmp_path: Path) -> Any:
    """Parse and instantiate a training config; returns the instantiated namespace."""
    from bptt.config.parser import build_parser, instantiate, parse_config

    parser = build_parser()
    return instantiate(parse_config(_training_args(path, tmp_path), parser), parser)


# --------------------------------------------------------------------------------------------------
# sweep files


def _one_sample(space: dict[str, Any]) -> dict[str, Any]:
    """One trial's values: a draw of every Tune domain, the first value of a grid."""
    return {key: dom["grid_search"][0] if isinstance(dom, dict) else dom.sample(random_state=0)
            for key, dom in space.items()}


def check_sweep_file(path: Path) -> dict[str, Any]:
    """Load a sweep file, build its Tune search space, scheduler and search algorithm, and parse one
    sampled trial's arguments as a training config; returns the sample."""
    from bptt.config.parser import parse_config
    from bptt.ray_jobs.sweep_config import load_sweep, scheduler, search_algorithm, trial_args, tune_space

    spec, base = load_sweep(path)
    space = tune_space(spec.space)
    assert set(space) == set(spec.space)
    scheduler(spec)
    search_algorithm(spec)
    sample = _one_sample(space)
    parse_config(trial_args(base, spec, sample), trusted=spec.trusted)
    return sample


# --------------------------------------------------------------------------------------------------
# cluster files: the Ray cluster launcher


def _ray_launcher_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _check_by_schema_keys(node: Any, schema: dict[str, Any], where: str) -> None:
    """The schema's required and allowed keys, for when jsonschema is not installed."""
    if not isinstance(node, dict) or schema.get("type") != "object":
        return
    for key in schema.get("required", []):
        assert key in node, f"{where}: {key!r} is required"
    props = schema.get("properties", {})
    pattern = schema.get("patternProperties", {}).get(".*")
    for key, value in node.items():
        if key in props:
            _check_by_schema_keys(value, props[key], f"{where}.{key}")
        elif pattern is not None:
            _check_by_schema_keys(value, pattern, f"{where}.{key}")
        else:
            assert schema.get("additionalProperties", True) is not False, f"{where}: {key!r} is not a known key"


def check_ray_cluster_config(config: dict[str, Any]) -> None:
    """What ``ray up`` checks before it starts anything: the schema (required keys, no unknown keys in
    the closed mappings), and that the head node type is one of the node types and the global
    ``max_workers`` holds every type's ``min_workers``."""
    schema = _ray_launcher_schema()
    try:
        import jsonschema
    except ImportError:
        _check_by_schema_keys(config, schema, "cluster config")
    else:
        jsonschema.validate(config, schema)
    types = config.get("available_node_types", {})
    assert types, "available_node_types is empty"
    assert config.get("head_node_type") in types, "head_node_type must be one of available_node_types"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]


# --------------------------------------------------------------------------------------------------
# cluster files: a KubeRay RayJob (apiVersion ray.io/v1). Field names are the json tags of KubeRay's
# Go API types; a name not listed is an unknown field, which `kubectl apply` (strict field validation)
# refuses. (required, allowed)

_OBJECT_META = {"name", "namespace", "labels", "annotations", "generateName"}
_RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
_RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                    "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions"}
_HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
_WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                 "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}
_POD_SPEC = {
    "containers", "initContainers", "volumes", "nodeSelector", "affinity", "tolerations", "serviceAccountName",
    "restartPolicy", "terminationGracePeriodSeconds", "securityContext", "imagePullSecrets", "priorityClassName",
    "schedulerName", "hostNetwork", "dnsPolicy", "runtimeClassName", "shmSize", "topologySpreadConstraints",
}
_CONTAINER = {
    "name", "image", "command", "args", "workingDir", "ports", "env", "envFrom", "resources", "volumeMounts",
    "lifecycle", "livenessProbe", "readinessProbe", "startupProbe", "securityContext", "imagePullPolicy",
    "volumeDevices", "terminationMessagePath", "terminationMessagePolicy", "stdin", "stdinOnce", "tty",
    "resizePolicy", "restartPolicy",
}


def _keys(node: Any, where: str, required: set[str], allowed: set[str]) -> dict[str, Any]:
    assert isinstance(node, dict), f"{where} must be a mapping"
    missing, unknown = required - set(node), set(node) - allowed - required
    assert not missing, f"{where}: missing {sorted(missing)}"
    assert not unknown, f"{where}: unknown field(s) {sorted(unknown)}"
    return node


def _check_pod_template(template: Any, where: str) -> None:
    _keys(template, where, {"spec"}, {"metadata"})
    spec = _keys(template["spec"], f"{where}.spec", {"containers"}, _POD_SPEC)
    assert spec["containers"], f"{where}.spec.containers is empty"
    for i, container in enumerate(spec["containers"]):
        _keys(container, f"{where}.spec.containers[{i}]", {"name", "image"}, _CONTAINER)
        for j, var in enumerate(container.get("env", [])):
            _keys(var, f"{where}.spec.containers[{i}].env[{j}]", {"name"}, {"value", "valueFrom"})
        if "resources" in container:
            _keys(container["resources"], f"{where}.spec.containers[{i}].resources", set(),
                  {"requests", "limits", "claims"})


def check_rayjob(doc: dict[str, Any]) -> None:
    """A KubeRay RayJob: apiVersion ray.io/v1, kind RayJob, spec.entrypoint, spec.rayClusterSpec with a
    headGroupSpec and workerGroupSpecs, each with a pod template."""
    _keys(doc, "RayJob", {"apiVersion", "kind", "metadata", "spec"}, set())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    _keys(doc["metadata"], "metadata", {"name"}, _OBJECT_META)
    spec = _keys(doc["spec"], "spec", {"entrypoint", "rayClusterSpec"}, _RAYJOB_SPEC)
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    cluster = _keys(spec["rayClusterSpec"], "spec.rayClusterSpec", {"headGroupSpec", "workerGroupSpecs"},
                    _RAYCLUSTER_SPEC)
    head = _keys(cluster["headGroupSpec"], "headGroupSpec", {"template"}, _HEAD_GROUP)
    _check_pod_template(head["template"], "headGroupSpec.template")
    assert cluster["workerGroupSpecs"], "workerGroupSpecs is empty"
    for i, group in enumerate(cluster["workerGroupSpecs"]):
        group = _keys(group, f"workerGroupSpecs[{i}]", {"groupName", "template"}, _WORKER_GROUP)
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31 - 1)
        _check_pod_template(group["template"], f"workerGroupSpecs[{i}].template")


def check_cluster_file(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    if isinstance(doc, dict) and ({"apiVersion", "kind"} & set(doc)):  # a Kubernetes manifest
        check_rayjob(doc)
    else:
        check_ray_cluster_config(doc)


# --------------------------------------------------------------------------------------------------
# the tests


def check(path: Path, tmp_path: Path) -> Any:
    kind = _kind(path)
    if kind == "training":
        return check_training_config(path, tmp_path)
    if kind == "sweep":
        return check_sweep_file(path)
    return check_cluster_file(path)


def test_conf_holds_every_kind():
    names = {_id(p) for p in CONF_FILES}
    assert {"lm/quickstart.yaml", "lm/tinyshakespeare_char.yaml", "lm/wikitext2_word.yaml", "asr/fsdd_digits.yaml",
            "forecast/co2.yaml", "forecast/sunspots.yaml", "synthetic/copy_memory.yaml", "synthetic/adding.yaml",
            "sweep/quickstart.yaml", "cluster/ray-cluster.yaml", "cluster/rayjob.yaml"} <= names


@pytest.mark.parametrize("path", CONF_FILES, ids=_id)
def test_conf_file_loads(path, tmp_path):
    from bptt.lightning_modules import TBPTTModule

    loaded = check(path, tmp_path)
    if _kind(path) != "training":
        return
    assert isinstance(loaded.task, TBPTTModule) and loaded.task.model is loaded.model
    data = type(loaded.data).__name__
    if data == "TextStreamDataModule":
        assert loaded.model.decoder.out_features == 4  # the stand-in vocabulary
    elif data == "SpeechDataModule":
        assert loaded.model.head.out_features == 11  # digits + the CTC blank
    elif data == "CopyMemoryDataModule":
        # + blank, delimiter
        assert loaded.model.decoder.out_features == loaded.data.vocab_size == loaded.data.symbols + 2
    else:
        assert loaded.model.head.out_features == loaded.model.horizon * loaded.model.num_targets


def _key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """The paths to the first and the last key of the first/last-key chains through nested mappings."""
    out = []
    for pick in (0, -1):
        path, here = prefix, node
        while isinstance(here, dict) and here:
            key = list(here)[pick]
            path = (*path, key)
            if not isinstance(here[key], dict) or not here[key]:
                break
            here = here[key]
        out.append(path)
    return list(dict.fromkeys(out))


def _typo_cases() -> list:
    return [pytest.param(path, keys, id=f"{_id(path)}:{'.'.join(map(str, keys))}")
            for path in CONF_FILES for keys in _key_paths(yaml.safe_load(path.read_text()))]


@pytest.mark.parametrize(("path", "keys"), _typo_cases())
def test_a_typo_d_key_fails(path, keys, tmp_path):
    """A copy of the conf tree with one key misspelt (a letter doubled) fails the file's check."""
    from bptt.errors import BpttError

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    copy = conf / path.relative_to(CONF)
    doc = yaml.safe_load(copy.read_text())
    parent = doc
    for key in keys[:-1]:
        parent = parent[key]
    parent[keys[-1] + keys[-1][-1]] = parent.pop(keys[-1])
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    errors: tuple[type[BaseException], ...] = (BpttError, AssertionError)
    try:
        import jsonschema

        errors += (jsonschema.ValidationError,)
    except ImportError:
        pass
    with pytest.raises(errors) as err:
        check(copy, tmp_path)
    assert keys[-1] in str(err.value)  # the message names the misspelt key (or the one now missing)


def test_the_schema_fallback_without_jsonschema_catches_a_typo():
    """The hand check used where jsonschema is not installed accepts the launcher config and refuses a typo."""
    config = yaml.safe_load((CONF / "cluster/ray-cluster.yaml").read_text())
    _check_by_schema_keys(config, _ray_launcher_schema(), "cluster config")
    config["head_node_typ"] = config.pop("head_node_type")
    with pytest.raises(AssertionError, match="'head_node_typ' is not a known key"):
        _check_by_schema_keys(config, _ray_launcher_schema(), "cluster config")
    config["head_node_type"] = config.pop("head_node_typ")
    del config["available_node_types"]["head"]["node_config"]
    with pytest.raises(AssertionError, match="'node_config' is required"):
        _check_by_schema_keys(config, _ray_launcher_schema(), "cluster config")
