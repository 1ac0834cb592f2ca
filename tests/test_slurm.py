"""The SLURM recipe under a real two-node SLURM on this machine (Debian's slurm-wlm and munge, two slurmd daemons
on one host): sbatch starts a Ray head on one node and a worker on the other, a tiny search uses both, and Ray is
gone when the job ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "cluster" / "slurm" / "tangle-ray.sbatch"
NEEDED = ("slurmctld", "slurmd", "sbatch", "munged")


def test_the_sbatch_script_passes_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (Debian package shellcheck; .ci/run installs it)")
    subprocess.run(["shellcheck", str(SCRIPT)], check=True)


def _slurm_conf(root: Path) -> Path:
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    nodes = "\n".join(f"NodeName=n{i} NodeHostname=localhost NodeAddr=127.0.0.1 Port={17000 + i} CPUs=1 "
                      "RealMemory=1000" for i in (1, 2))
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=tangle
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{nodes}
PartitionName=all Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


@pytest.fixture
def slurm(tmp_path):
    """A two-node SLURM (n1, n2) on this host; yields the environment its clients need."""
    missing = [c for c in NEEDED if not shutil.which(c) and not Path(f"/usr/sbin/{c}").exists()]
    if missing or os.geteuid() != 0:
        pytest.skip(f"SLURM cannot run here (missing {missing}, root: {os.geteuid() == 0}); "
                    "`apt-get install slurm-wlm munge` as root (.ci/run does)")
    root = tmp_path / "slurm"
    conf = _slurm_conf(root)
    env = {**os.environ, "SLURM_CONF": str(conf), "RAY_AUTH_MODE": "disabled",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    munge_pid = Path("/run/munge/munged.pid")
    started_munge = not munge_pid.exists()
    if started_munge:
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    daemons = [subprocess.Popen(["/usr/sbin/slurmctld", "-D", "-f", str(conf)], env=env)]
    daemons += [subprocess.Popen(["/usr/sbin/slurmd", "-D", "-f", str(conf), "-N", n], env=env) for n in ("n1", "n2")]
    try:
        _wait(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
              .stdout.split() == ["idle"], 60, "SLURM nodes did not become idle")
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        for d in daemons:
            try:
                d.wait(timeout=20)
            except subprocess.TimeoutExpired:
                d.kill()
        if started_munge and munge_pid.exists():
            os.kill(int(munge_pid.read_text()), 15)


def _state(job: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")


def test_sbatch_starts_ray_on_both_nodes_runs_a_search_and_stops_ray(slurm, tmp_path):
    from tangle_ray.data.text.prepare import prepare_text
    from tangle_ray.data.text.sources import TextSource
    from tangle_ray.data.text.synth import write_demo_corpus

    corpus = write_demo_corpus(tmp_path / "raw", n_train=200, n_valid=40, seed=0)
    tokens = prepare_text(TextSource(kind="jsonl", path=str(corpus)), tmp_path / "tokens")
    log = tmp_path / "job.log"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", f"--output={log}", "-D", str(ROOT), str(SCRIPT), "tangle-ray", "search",
         "recipes/runs/tiny-cpu-tanglenas.yaml", f"data.dir={tokens}", f"run.storage_path={tmp_path / 'runs'}",
         "run.name=slurm", "steps=4", "log_every=2", "eval_every=2", "checkpoint_every=2", "eval_samples=4",
         "scaling.num_workers=2"],
        env={**slurm, "RAY_HEAD_IP": "127.0.0.1"}, capture_output=True, text=True, check=True)
    job = submit.stdout.strip().split(";")[0]
    _wait(lambda: _state(job, slurm) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), 600,
          f"job {job} did not finish")
    text = log.read_text()
    assert _state(job, slurm) == "COMPLETED", text[-3000:]
    assert "all 2 Ray nodes joined" in text
    run = tmp_path / "runs" / "slurm"
    assert "2 worker(s)" in (run / "summary.md").read_text() and (run / "export" / "arch.json").is_file()
    state = json.loads(next(run.glob("checkpoint_*/trainer_state.json")).read_text())
    assert len(set(state["nodes"])) == 2  # the two workers ran on the two SLURM nodes' Ray nodes
    leftover = subprocess.run(["pgrep", "-f", "ray start --block"], capture_output=True, text=True).stdout
    assert not leftover.strip(), f"Ray processes left after the job: {leftover}"
