"""Configs compose, validate and name the offending key."""

import pytest

from pmc_pipeline.config import CONFIG_DIR, load_config
from pmc_pipeline.errors import ConfigError

SHIPPED = [("finetune", "finetune/phi-1.5"), ("finetune", "finetune/llama-3.2-3b"),
           ("unlearn", "unlearn/phi-1.5"), ("unlearn", "unlearn/llama-3.2-3b"),
           ("demo", "demo/tiny"), ("demo", "demo/smollm2")]


@pytest.mark.parametrize("kind,name", SHIPPED)
def test_shipped_configs_load(kind, name):
    assert load_config(kind, name).seed == 0


def test_reference_hyperparameters_are_the_papers():
    llama = load_config("unlearn", "unlearn/llama-3.2-3b")
    phi = load_config("unlearn", "unlearn/phi-1.5")
    assert (llama.pmc.lambda_retain, llama.sampling.temperature, llama.sampling.num_samples, llama.pmc.epochs) == (1.25, 0.9, 20, 30)
    assert (phi.pmc.lambda_retain, phi.sampling.temperature, phi.sampling.num_samples, phi.pmc.epochs) == (1.5, 1.25, 5, 40)
    assert (phi.trainer.batch_size, phi.trainer.grad_accum, llama.trainer.batch_size, llama.trainer.grad_accum) == (16, 4, 8, 2)


def test_overrides_apply_with_types():
    cfg = load_config("unlearn", "unlearn/phi-1.5", ["pmc.epochs=3", "sampling.temperature=0.7", "trainer.world_size=2"])
    assert (cfg.pmc.epochs, cfg.sampling.temperature, cfg.trainer.world_size) == (3, 0.7, 2)


def test_hydra_defaults_list_composes(tmp_path):
    (tmp_path / "base.yaml").write_text("pmc: {epochs: 7}\nrun_dir: r\nmodel: {path: m}\n")
    (tmp_path / "child.yaml").write_text("defaults: [base, _self_]\nsampling: {num_samples: 3}\n")
    cfg = load_config("unlearn", str(tmp_path / "child.yaml"))
    assert (cfg.pmc.epochs, cfg.sampling.num_samples) == (7, 3)


@pytest.mark.parametrize("override,message", [
    ("pmc.foo=1", "unknown config key 'pmc.foo'"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
    ("pmc.selection=best", "pmc.selection='best' is not allowed; choose one of: argmax"),
    ("model.dtype=int4", "model.dtype='int4' is not allowed"),
    ("sampling.top_p=1.5", "sampling.top_p=1.5 is out of range"),
    ("sampling.num_samples=0", "sampling.num_samples=0 is out of range"),
    ("pmc.epochs=abc", "bad value for 'pmc.epochs'"),
    ("justaword", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config("unlearn", "unlearn/phi-1.5", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x}\nrun_dir: r\ntrainer: {learning_rte: 1.0e-5}\n")
    with pytest.raises(ConfigError) as info:
        load_config("unlearn", str(bad))
    assert str(bad) in str(info.value) and "trainer.learning_rte" in str(info.value)


def test_missing_required_keys_are_listed(tmp_path):
    (tmp_path / "empty.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="model.path"):
        load_config("unlearn", str(tmp_path / "empty.yaml"))


def test_config_names_resolve_under_configs_dir():
    assert (CONFIG_DIR / "demo" / "tiny.yaml").is_file()
    with pytest.raises(ConfigError, match="config file not found: nope"):
        load_config("unlearn", "nope")


def test_demo_sections_take_any_job_key_and_are_checked_when_built():
    from pmc_pipeline.recipes.demo import job_config

    cfg = load_config("demo", "demo/tiny", ["unlearn.pmc.reward=self_bleu", "finetune.epochs=3"])
    built = job_config("unlearn", cfg.unlearn, {"model": {"path": "m"}, "run_dir": "r"})
    assert (built.pmc.reward, cfg.finetune["epochs"]) == ("self_bleu", 3)
    typo = load_config("demo", "demo/tiny", ["unlearn.pmc.rewrd=x"])
    with pytest.raises(ConfigError, match="unknown config key 'pmc.rewrd'"):
        job_config("unlearn", typo.unlearn, {"model": {"path": "m"}, "run_dir": "r"})


def test_a_run_saved_before_a_setting_existed_counts_it_as_its_default(tmp_path):
    """prepare_run_dir / resume compare with the run's config.yaml: a key it lacks (added to pmc since the run)
    is its default, so a finished run stays finished; a key it holds with another value is still a change."""
    import yaml

    from pmc_pipeline.config import from_mapping, to_dict
    from pmc_pipeline.recipes.unlearn_run_dir import config_changes

    cfg = from_mapping("unlearn", {"model": {"path": "m"}, "run_dir": str(tmp_path)})
    saved = to_dict(cfg)
    del saved["rollout"]["model_impl"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_changes(tmp_path, cfg) == []
    changed = from_mapping("unlearn", {"model": {"path": "m"}, "run_dir": str(tmp_path), "rollout": {"model_impl": "vllm"}})
    assert config_changes(tmp_path, changed) == ["rollout.model_impl"]
