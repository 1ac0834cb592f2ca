"""Bad input is refused on the driver, before any worker starts, with the field, the value and what is allowed."""

import glob
from pathlib import Path

import pytest

from tangle_ray import load_space
from tangle_ray.errors import ConfigError, DataError, TangleRayError
from tangle_ray.train.config import from_dict, load_config
from tangle_ray.train.deepspeed import deepspeed_config, lr_factor
from tangle_ray.train.runner import preflight

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "recipes" / "runs" / "*.yaml"))))
def test_every_run_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.global_batch_size % (cfg.scaling.num_workers * cfg.micro_batch_size) == 0


def test_defaults_are_the_tanglenas_lm_settings():
    cfg = from_dict({})
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.betas) == (5e-4, 5e-5, (0.9, 0.99))
    assert (cfg.optimizer.weight_decay, cfg.optimizer.grad_clip, cfg.arch_optimizer.grad_clip) == (0.1, 1.0, 5.0)
    a = cfg.arch_optimizer
    assert (a.lr, a.betas, a.weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    assert cfg.global_batch_size * 224 == 53_760 and cfg.steps == 6000 and cfg.data.valid_fraction == 0.2
    assert cfg.mixer == "drnas"


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["method=enas"], ["method", "'enas'", "tanglenas", "spos"]),
        (["mixer=random"], ["mixer", "'random'", "drnas", "darts", "gdas"]),
        (["zero_stage=4"], ["zero_stage", "4", "[0, 1, 2, 3]"]),
        (["global_batch_size=10", "micro_batch_size=2", "scaling.num_workers=3"],
         ["global_batch_size = 10", "3 x 2 = 6"]),
        (["optimizer.lr=fast"], ["optimizer.lr", "'fast'", "number"]),
        (["optimiser.lr=1"], ["unknown", "optimiser"]),
        (["precision=fp8"], ["precision", "fp8", "bf16"]),
        (["precision=fp16"], ["precision = 'fp16'", "scaling.use_gpu", "CPU accelerator has no fp16"]),
        (["compile=true", "method=spos"], ["compile", "'spos'", "ZeRO stages 0-2"]),
        (["compile=true", "zero_stage=3"], ["compile", "zero_stage 3"]),
        (["steps"], ["key=value"]),
        (["run.storage_path=ftp://bucket/runs"], ["run.storage_path = 'ftp://bucket/runs'", "scheme 'ftp'", "NFS"]),
        (["data.dir=gs:///tokens"], ["data.dir = 'gs:///tokens'", "expected gs://bucket/folder"]),
        (["arch={n_layer: 2}"], ["arch is set", "would ignore it", "tangle-ray retrain --arch"]),
    ],
)
def test_bad_settings_name_field_value_and_allowed(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_malformed_run_file_names_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)
    bad.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml.*stepz"):
        load_config(bad)


def test_preflight_refuses_bad_space_data_storage_and_checkpoints(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="no-such-space"):
        preflight(load_config(None, ["space=no-such-space", f"data.dir={data_dir}"]))
    with pytest.raises(ConfigError, match="meta.json"):
        preflight(load_config(None, ["space=gpt-nano", f"data.dir={tmp_path / 'nothing'}"]))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write"):
        preflight(load_config(None, ["space=gpt-nano", f"data.dir={data_dir}", f"run.storage_path={blocker}"]))
    with pytest.raises(DataError, match="vocabulary"):
        preflight(load_config(None, ["space=gpt-micro", f"data.dir={data_dir}", f"run.storage_path={tmp_path}"]))
    arch = load_config(None, ["method=fixed", "space=gpt-nano", f"data.dir={data_dir}", f"run.storage_path={tmp_path}",
                              "arch={n_layer: 9, n_embd: 32, n_head: [2, 2, 2, 2], mlp_ratio: [2, 2, 2, 2]}"])
    with pytest.raises(ConfigError, match=r"n_layer = 9 .*\[2, 3, 4\]"):
        preflight(arch)


def test_rerun_with_another_config_under_the_same_name_is_refused(tmp_path, data_dir):
    base = ["space=gpt-nano", f"data.dir={data_dir}", f"run.storage_path={tmp_path}", "run.name=fixed-name"]
    cfg = load_config(None, base)
    preflight(cfg)
    (cfg.run_dir() / "run_config.yaml").write_text("identity: {seed: 99}\n")
    with pytest.raises(ConfigError, match="different configuration"):
        preflight(load_config(None, base))


def test_default_run_name_is_stable_and_changes_with_the_config():
    a, b = load_config(None, ["seed=1"]), load_config(None, ["seed=1", "steps=10"])
    assert a.run_name() == b.run_name()  # more steps: the same run, resumed and extended
    assert a.run_name() != load_config(None, ["seed=2"]).run_name()


def test_deepspeed_config_and_schedule():
    cfg = load_config(None, ["global_batch_size=16", "micro_batch_size=2", "scaling.num_workers=2", "zero_stage=3",
                             "steps=100", "optimizer.warmup_steps=10",
                             "deepspeed={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 16
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert not ds["bf16"]["enabled"]
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)  # cosine down to min_lr = lr / 10


def _fake_checkpoint(run_dir, world_size, space_choices):
    """The files the driver reads before resuming (DeepSpeed's shards are not needed for these checks)."""
    import json

    from tangle_ray.manifest import write_manifest
    from tangle_ray.space import space_to_dict

    space = space_to_dict(load_space("gpt-nano"))
    space["choices"].update(space_choices)

    folder = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": world_size, "zero_stage": 2,
                                                           "method": "tanglenas", "arch": None}))
    (folder / "run_state.json").write_text(json.dumps({"step": 2, "world_size": world_size, "space": space,
                                                       "history": {}, "method": {}}))
    write_manifest(folder)
    return folder


def test_resume_checks_workers_and_space_before_any_worker_starts(tmp_path, data_dir):
    base = ["space=gpt-nano", f"data.dir={data_dir}", f"run.storage_path={tmp_path}"]
    cfg = load_config(None, [*base, "run.name=other-workers"])
    _fake_checkpoint(cfg.run_dir(), world_size=2, space_choices={"n_layer": [2, 3, 4], "n_embd": [32, 48, 64]})
    with pytest.raises(ConfigError, match="written by 2 workers but scaling.num_workers = 1"):
        preflight(cfg)
    cfg = load_config(None, [*base, "run.name=other-space"])
    _fake_checkpoint(cfg.run_dir(), world_size=1, space_choices={"n_layer": [5, 6, 7], "n_embd": [96]})
    with pytest.raises(ConfigError, match="another space"):
        preflight(cfg)


def test_export_of_a_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    from tangle_ray.train.export import export_run

    with pytest.raises(TangleRayError, match="no checkpoint found"):
        export_run(tmp_path / "no-run")
    folder = _fake_checkpoint(tmp_path / "run", world_size=1, space_choices={})
    (folder / "run_state.json").write_bytes(b"not a checkpoint")
    with pytest.raises(TangleRayError, match="run_state.json is 16 bytes, its manifest says .*: truncated or modified"):
        export_run(tmp_path / "run")


def test_retrain_from_a_missing_supernet_is_refused_on_the_driver(tmp_path, data_dir):
    cfg = load_config(None, ["method=fixed", "space=gpt-nano", f"data.dir={data_dir}", f"run.storage_path={tmp_path}",
                             "arch={n_layer: 2, n_embd: 32, n_head: [2, 2, 2, 2], mlp_ratio: [2, 2, 2, 2]}",
                             "init=inherit", f"init_from={tmp_path / 'no-supernet'}"])
    with pytest.raises(TangleRayError, match="missing.*supernet.safetensors"):
        preflight(cfg)


def test_a_run_file_is_read_once_from_the_command_line_to_the_workers(tmp_path, data_dir, monkeypatch):
    """The CLI, the config, the driver's checks and the method never read the run file again: it is parsed
    once into the typed config that the workers receive."""
    from tangle_ray import cli, configs
    from tangle_ray.train import runner

    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"space: gpt-nano\nsteps: 3\nrun: {{storage_path: {tmp_path / 'runs'}}}\n"
                        f"data: {{dir: {data_dir}}}\n")
    reads, real = [], configs.read_text
    monkeypatch.setattr(configs, "read_text", lambda path, *a, **k: reads.append(Path(path)) or real(path, *a, **k))

    class ReachedRay(Exception):
        pass

    def joined(*args, **kwargs):
        raise ReachedRay

    monkeypatch.setattr(runner, "connect", joined)  # where the workers would be started next
    with pytest.raises(ReachedRay):
        cli.main(["search", str(run_file), "optimizer.lr=1e-3"])
    assert reads.count(run_file) == 1
