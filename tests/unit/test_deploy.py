"""deploy/ and docs/metrics.md checked against the code, so neither can drift from it.

The metrics catalog is compared with what the three metric classes really expose; every metric
named in a query (Grafana dashboard, docs) must be in the catalog; ports in the Prometheus,
Kubernetes and Slurm files must be the NetConfig offsets. Nothing here needs Kubernetes, Slurm,
a GPU or a container engine: the Slurm script is dry-run with stand-ins for srun and scontrol.
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from prometheus_client import CollectorRegistry

from asyncrl.config import NetConfig, load_config
from tests.conftest import ROOT
from tests.helpers.metrics import (
    ROLE_CLASSES,
    dashboard,
    dashboard_exprs,
    doc_queries,
    filled,
    metric_objects,
)

NET = NetConfig()  # the default base port, 47100
DEPLOY = ROOT / "deploy"
# Sample suffixes as exposed; prometheus_client adds _created unless told not to.
SAMPLE_SUFFIXES = {"counter": {"_total"}, "gauge": {""}, "histogram": {"_bucket", "_sum", "_count"}}


def exposed() -> dict[str, dict]:
    """name as exposed (counters with _total) -> type, role, label names, buckets, samples."""
    out = {}
    for role, cls in ROLE_CLASSES.items():
        m = cls(CollectorRegistry())
        labels = {metric._name: tuple(metric._labelnames) for metric in metric_objects(m)}
        for fam in filled(cls).collect():
            name = fam.name + ("_total" if fam.type == "counter" else "")
            buckets = sorted({float(s.labels["le"]) for s in fam.samples
                              if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"})
            assert name not in out, f"{name} defined twice"
            out[name] = {"type": fam.type, "role": role, "buckets": buckets,
                         "labels": labels[fam.name], "family": fam.name,
                         "samples": {s.name for s in fam.samples}}
    return out


def catalog() -> dict[str, dict]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    section = text.split("\n## Catalog", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `asyncrl_"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 6, line
        name, kind, unit, labels, process, meaning = cells
        name = name.strip("`")
        assert name not in rows, f"{name} listed twice in docs/metrics.md"
        buckets = []
        if "`le`:" in labels:
            buckets = [float(x) for x in labels.split("`le`:", 1)[1].split(",")]
        values = re.search(r"\{([^}]*)\}", labels)
        rows[name] = {"type": kind, "unit": unit, "process": process, "meaning": meaning,
                      "labels": tuple(n for n in re.findall(r"`(\w+)`", labels) if n != "le"),
                      "label_values": [v.strip() for v in values.group(1).split(",")]
                      if values else [], "buckets": buckets}
    return rows


def test_catalog_lists_exactly_the_metrics_the_code_defines():
    code, doc = exposed(), catalog()
    assert sorted(set(code) - set(doc)) == [], "defined in asyncrl/metrics.py, not documented"
    assert sorted(set(doc) - set(code)) == [], "documented, not defined in asyncrl/metrics.py"
    for name, c in code.items():
        d = doc[name]
        assert d["type"] == c["type"], name
        assert d["process"].split(",")[0].split()[0] == c["role"], (name, d["process"])
        assert d["labels"] == c["labels"], name
        assert d["buckets"] == c["buckets"], f"{name}: documented buckets differ from the code"
        assert d["unit"] and d["meaning"], name


def test_names_follow_prometheus_conventions_as_exposed():
    for name, c in exposed().items():
        assert re.fullmatch(r"asyncrl_(generator|buffer|learner|sync|run|evaluator|reward)_[a-z_]+", name), name
        assert (c["type"] == "counter") == name.endswith("_total"), name
        suffixes = {s[len(c["family"]):] for s in c["samples"]} - {"_created"}
        assert suffixes == SAMPLE_SUFFIXES[c["type"]], name


def _reject_reasons_in_code() -> set[str]:
    """Every string a MessageError can carry as reason, and the buffer's own labels."""
    found = set()
    trees = [ast.parse(p.read_text()) for p in (ROOT / "asyncrl" / "wire").glob("*.py")]
    for node in (n for tree in trees for n in ast.walk(tree)):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MessageError"
                and node.args):
            found |= {n.value for n in ast.walk(node.args[0])
                      if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    buffer_main = (ROOT / "asyncrl" / "buffer" / "main.py").read_text()
    found |= set(re.findall(r"rejected\.labels\(\"(\w+)\"\)", buffer_main))
    return found


def test_reject_reasons_documented_are_those_in_the_code():
    documented = catalog()["asyncrl_buffer_messages_rejected_total"]["label_values"]
    assert len(documented) == len(set(documented))
    assert set(documented) == _reject_reasons_in_code()


# --- queries: every metric they name is in the catalog ------------------------------------

def _resolve(name: str, doc: dict) -> str | None:
    if name in doc:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and doc.get(base, {}).get("type") == "histogram":
            return base
    return None


@pytest.mark.parametrize("source", ["dashboard", "docs"])
def test_every_queried_metric_is_in_the_catalog(source):
    exprs = dashboard_exprs() if source == "dashboard" else doc_queries()
    assert len(exprs) > 10
    doc = catalog()
    names = {n for e in exprs for n in re.findall(r"\basyncrl_[a-z_]+", e)}
    unknown = sorted(n for n in names if _resolve(n, doc) is None)
    assert unknown == []
    for e in exprs:  # counters only make sense inside rate/increase
        for n in re.findall(r"\basyncrl_[a-z_]+_total\b", e):
            assert re.search(rf"(rate|increase)\({n}\b", e), e


def test_dashboard_structure():
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    (var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for topic in ("tokens/s", "trajectories/s", "steps/s", "step time", "staleness",
                  "occupancy", "stale drops", "rejects by reason", "weight-sync time",
                  "weight-sync bytes", "reward", "eval accuracy", "policy versions"):
        assert topic in titles, topic
    for p in d["panels"]:
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    assert any(p["type"] == "heatmap" and "staleness_versions_bucket" in p["targets"][0]["expr"]
               for p in d["panels"])


# --- Prometheus scrape config ---------------------------------------------------------------

def test_prometheus_yml_targets_use_the_default_ports():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert cfg["global"]["scrape_interval"] == "5s"
    jobs = {j["job_name"]: j["static_configs"] for j in cfg["scrape_configs"]}
    assert set(jobs) == {"asyncrl-buffer", "asyncrl-generator", "asyncrl-learner",
                         "asyncrl-reward"}

    def ports(job, label):
        out = {}
        for sc in jobs[job]:
            (target,) = sc["targets"]
            host, port = target.rsplit(":", 1)
            assert host == "localhost"
            out[sc.get("labels", {}).get(label)] = int(port)
        return out

    assert ports("asyncrl-buffer", None) == {None: NET.buffer_metrics_port}
    assert ports("asyncrl-reward", None) == {None: NET.reward_metrics_port}
    gens = ports("asyncrl-generator", "generator")
    assert gens == {str(i): NET.generator_metrics_port(i) for i in range(len(gens))}
    ranks = ports("asyncrl-learner", "rank")
    assert ranks == {str(r): NET.learner_metrics_port(r) for r in range(len(ranks))}
    assert len(gens) >= 1 and len(ranks) >= 1


# --- Kubernetes -----------------------------------------------------------------------------

def k8s_objects() -> dict[tuple[str, str], dict]:
    objs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def _run_config(objs, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(objs[("ConfigMap", "asyncrl-config")]["data"]["run.yaml"])
    return load_config(path)


def _service_ports(svc) -> dict[str, int]:
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert all(p["targetPort"] == p["port"] for p in svc["spec"]["ports"])
    return ports


def _torchrun_args(job) -> dict[str, str]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    cmd = " ".join(container["command"] + container["args"])
    return dict(re.findall(r"--([\w-]+)=(\S+)", cmd))


def test_k8s_manifests_parse_and_use_the_netconfig_ports(tmp_path):
    objs = k8s_objects()
    for kind in ("ConfigMap", "Deployment", "StatefulSet", "Job", "Service"):
        assert any(k == kind for k, _ in objs), kind
    cfg = _run_config(objs, tmp_path)
    net = cfg.net
    assert net.base_port == NET.base_port and net.bind_host == "0.0.0.0"

    buffer = _service_ports(objs[("Service", "asyncrl-buffer")])
    assert sorted(buffer.values()) == [net.buffer_ingest_port, net.buffer_learner_port,
                                       net.heartbeat_port, net.buffer_metrics_port]
    assert net.buffer_host == "asyncrl-buffer"

    reward = _service_ports(objs[("Service", "asyncrl-reward")])
    assert reward == {"score": net.reward_port, "metrics": net.reward_metrics_port}
    assert net.reward_host == "asyncrl-reward"
    (c,) = objs[("Deployment", "asyncrl-reward")]["spec"]["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in c["ports"]} == set(reward.values())
    assert c["command"][:2] == ["asyncrl", "reward"]

    sts = objs[("StatefulSet", "asyncrl-generator")]
    n_gen = cfg.generator.num_generators
    assert sts["spec"]["replicas"] == n_gen
    gen = _service_ports(objs[("Service", "asyncrl-generator")])
    assert gen == {f"metrics-g{i}": net.generator_metrics_port(i) for i in range(n_gen)}

    job = objs[("Job", "asyncrl-learner")]
    args = _torchrun_args(job)
    pods, per_pod = job["spec"]["completions"], int(args["nproc-per-node"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert int(args["nnodes"]) == pods == job["spec"]["parallelism"]
    assert pods * per_pod == cfg.learner.nproc
    assert args["rdzv-backend"] == "c10d"
    assert args["rdzv-endpoint"] == f"{net.learner_host}:29400"
    svc = objs[("Service", "asyncrl-learner")]
    assert svc["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    assert net.learner_host == f"asyncrl-learner-0.{svc['metadata']['name']}"
    learner = _service_ports(svc)
    assert learner["sync-control"] == net.sync_control_port
    assert learner["sync-store"] == net.sync_store_port
    assert learner["rdzv"] == 29400
    assert {k: v for k, v in learner.items() if k.startswith("metrics-")} == {
        f"metrics-r{r}": net.learner_metrics_port(r) for r in range(cfg.learner.nproc)}

    for kind, name in objs:
        if kind in ("Deployment", "StatefulSet", "Job"):
            (c,) = objs[(kind, name)]["spec"]["template"]["spec"]["containers"]
            gpus = c["resources"]["requests"].get("nvidia.com/gpu")
            assert gpus == (None if name == "asyncrl-buffer" else
                            1 if kind == "StatefulSet" or name == "asyncrl-reward"
                            else per_pod), name


def test_every_k8s_role_mounts_the_curve_keys_secret_owner_only(tmp_path):
    objs = k8s_objects()
    cfg = _run_config(objs, tmp_path)
    assert cfg.net.curve and cfg.net.keys_dir == "/etc/asyncrl/keys"
    for kind, name in objs:
        if kind in ("Deployment", "StatefulSet", "Job"):
            spec = objs[(kind, name)]["spec"]["template"]["spec"]
            (c,) = spec["containers"]
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert mounts["keys"]["mountPath"] == cfg.net.keys_dir and mounts["keys"]["readOnly"]
            (vol,) = [v for v in spec["volumes"] if v["name"] == "keys"]
            assert vol["secret"] == {"secretName": "asyncrl-keys", "defaultMode": 0o400}, name


def test_slurm_job_makes_the_run_keys_before_any_role_starts():
    text = (DEPLOY / "slurm" / "two-pool.sbatch").read_text()
    assert text.index('-m asyncrl keys "$RUN_DIR/keys"') < text.index("srun ")


def test_service_monitor_keeps_each_port_on_the_pod_that_binds_it(tmp_path):
    objs = k8s_objects()
    cfg = _run_config(objs, tmp_path)
    per_pod = int(_torchrun_args(objs[("Job", "asyncrl-learner")])["nproc-per-node"])
    monitors = list(yaml.safe_load_all(
        (DEPLOY / "prometheus" / "asyncrl-servicemonitor.yaml").read_text()))
    services = {s["metadata"]["labels"]["app.kubernetes.io/component"]: s
                for (k, _), s in objs.items() if k == "Service"}
    seen = {}
    for sm in monitors:
        assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
        component = sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        svc = services[component]
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        ports = _service_ports(svc)
        for ep in sm["spec"]["endpoints"]:
            seen[ep["port"]] = ports[ep["port"]]
            if component in ("buffer", "reward"):  # one pod each: nothing to pick
                continue
            keep = [r for r in ep["relabelings"] if r.get("action") == "keep"][0]
            index = int(next(r for r in ep["relabelings"] if "targetLabel" in r)["replacement"])
            if component == "generator":
                assert ports[ep["port"]] == cfg.net.generator_metrics_port(index)
                assert keep["regex"] == f"asyncrl-generator-{index}"
            else:
                assert ports[ep["port"]] == cfg.net.learner_metrics_port(index)
                assert re.fullmatch(keep["regex"], f"asyncrl-learner-{index // per_pod}-x7k2p")
                assert not re.fullmatch(keep["regex"],
                                        f"asyncrl-learner-{index // per_pod + 1}-x7k2p")
    # every metrics port of every Service is scraped
    expected = {n: p for s in services.values() for n, p in _service_ports(s).items()
                if n.startswith("metrics")}
    assert seen == expected


# --- Slurm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["two-pool.sbatch", "asyncrl-task.sh"])
def test_slurm_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / script)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


FAKE_SRUN = """#!/bin/bash
# Stand-in for srun: record the step, run its task once with a recording "python".
printf '%s\\n' "$*" >> "$FAKE_LOG/srun.log"
role=${!#}
task=${@: -2:1}
SLURM_PROCID=1 SLURMD_NODENAME=node-x PY="$FAKE_LOG/py" "$task" "$role"
[ "$role" = learner ] || exec sleep 30
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && tr , '\\n' <<< "$3"
"""


@pytest.mark.parametrize("mode", ["hetjob", "split"])
def test_slurm_dry_run_writes_hosts_and_starts_every_role(tmp_path, mode):
    bin_dir, log, run_dir, model = (tmp_path / d for d in ("bin", "log", "run", "model"))
    for d in (bin_dir, log, model):
        d.mkdir()
    (model / "config.json").write_text("{}")
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("py", '#!/bin/bash\nprintf "%s\\n" "$*" >> "$FAKE_LOG/py.log"\n')):
        target = (log if name == "py" else bin_dir) / name
        target.write_text(text)
        target.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "PY": sys.executable, "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(ROOT),
           "RUN_DIR": str(run_dir), "GPUS_PER_INFER_NODE": "2", "GPUS_PER_TRAIN_NODE": "2",
           "POLL_S": "0.2"}
    for k in list(env):
        if k.startswith("SLURM_JOB_NODELIST"):
            del env[k]
    if mode == "hetjob":
        env |= {"SLURM_JOB_NODELIST_HET_GROUP_0": "inf1",
                "SLURM_JOB_NODELIST_HET_GROUP_1": "trn-b,trn-a"}
        infer, train, step = "inf1", ["trn-a", "trn-b"], {"infer": "--het-group=0",
                                                          "train": "--het-group=1",
                                                          "buffer": "--het-group=1"}
    else:
        env |= {"SLURM_JOB_NODELIST": "inf1,trn-b,trn-a", "INFER_NODES": "1"}
        infer, train, step = "inf1", ["trn-a", "trn-b"], {"infer": "--nodelist=inf1",
                                                          "train": "--nodelist=trn-a,trn-b",
                                                          "buffer": "--nodes=1"}
    r = subprocess.run(["bash", str(DEPLOY / "slurm" / "two-pool.sbatch"), "configs/default.yaml",
                        f"model.path={model}", "learner.lr=1e-4", "learner.max_restarts=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

    cfg = load_config(run_dir / "config.yaml")
    assert cfg.net.buffer_host == cfg.net.learner_host == train[0]  # first in sorted order
    assert cfg.net.bind_host == "0.0.0.0" and cfg.run_dir == str(run_dir)
    assert cfg.generator.num_generators == 2 and cfg.learner.nproc == 4
    assert cfg.model.path == str(model) and cfg.learner.lr == 1e-4
    assert cfg.weight_sync.backend == "nccl"

    listed = json.loads((run_dir / "prometheus-targets.json").read_text())
    targets = {(t["labels"]["role"], t["labels"].get("generator", t["labels"].get("rank"))):
               t["targets"][0] for t in listed}
    net = cfg.net
    assert targets == {
        ("buffer", None): f"{train[0]}:{net.buffer_metrics_port}",
        **{("generator", str(i)): f"{infer}:{net.generator_metrics_port(i)}" for i in range(2)},
        **{("learner", str(k)): f"{train[k // 2]}:{net.learner_metrics_port(k)}"
           for k in range(4)}}

    steps = (log / "srun.log").read_text().splitlines()
    assert len(steps) == 3, steps
    by_role = {s.split()[-1]: s for s in steps}
    assert step["buffer"] in by_role["buffer"] and f"--nodelist={train[0]}" in by_role["buffer"]
    assert by_role["buffer"].count("--nodelist") == 1
    assert step["infer"] in by_role["generator"] and "--ntasks=2" in by_role["generator"]
    assert "--gpus-per-task=1" in by_role["generator"]
    assert step["train"] in by_role["learner"] and "--nodes=2" in by_role["learner"]

    config = f"--config {run_dir}/config.yaml"
    cmds = (log / "py.log").read_text().splitlines()
    assert f"-m asyncrl buffer {config}" in cmds
    assert f"-m asyncrl generator {config} --index 1" in cmds
    (torchrun,) = [c for c in cmds if "torch.distributed.run" in c]
    # --max-restarts is the config's learner.max_restarts, not a number in the script
    assert torchrun == (f"-m torch.distributed.run --nnodes=2 --nproc-per-node=2 --max-restarts=2 "
                        f"--rdzv-backend=c10d --rdzv-endpoint={train[0]}:29400 "
                        f"--rdzv-id=asyncrl-42 --local-addr=node-x -m asyncrl.learner {config}")


# --- container ------------------------------------------------------------------------------

def test_dockerfile_installs_vllm_then_this_package():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M)
    assert text.index('pip install "vllm==') < text.index('pip install ".[gpu]"')
    for line in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for src in line.split():
            assert (ROOT / src).exists(), src
