"""Strict params: typos, wrong types and out-of-range values fail naming the key."""
import pytest
import yaml

from spatlib.config import (ConfigError, EvalConfig, RunConfig, format_eps, from_dict, load_config,
                            parse_eps)
from spatlib.experiment import expand_experiment, load_experiment


def test_defaults_round_trip_through_yaml():
    cfg = RunConfig()
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_eps_fraction_strings_are_parsed_and_formatted_back():
    cfg = from_dict({"attack": {"eps": "8/255", "alpha": "2/255"}})
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert format_eps(cfg.attack.eps) == "8/255"
    assert format_eps(0.3) == "0.3"
    assert format_eps(0.2) == "0.2"            # 51/255 exactly, but 0.2 is how it was written
    assert format_eps(2.5 / 255) == "0.00980392"   # no short decimal, not a whole number of 255ths
    assert format_eps(16 / 255) == "16/255"
    assert parse_eps(0.1) == 0.1


def test_eval_eps_is_the_eval_sections_eps_else_the_training_eps():
    # the one definition of the eval budget: report's cache names, spat eval's cards and the
    # suite all read it
    cfg = from_dict({"attack": {"eps": "8/255"}})
    assert cfg.eval.eps is None and cfg.eval_eps() == pytest.approx(8 / 255)
    cfg = from_dict({"attack": {"eps": "8/255"}, "eval": {"eps": 0.0}})
    assert cfg.eval_eps() == 0.0                        # 0 is a budget, not "unset"
    # settings in force (notebook 03's, spat eval --eps) win over the run's own eval section
    other = from_dict({"eps": "4/255"}, EvalConfig)
    assert cfg.eval_eps(other) == pytest.approx(4 / 255)
    assert cfg.eval_eps(from_dict({}, EvalConfig)) == pytest.approx(8 / 255)


def test_misspelt_key_in_params_file_names_the_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  method: pgd_at\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.learning_rate" in msg and "lr" in msg and str(p) in msg


@pytest.mark.parametrize("data, key, allowed", [
    ({"attack": {"eps": 1.5}}, "attack.eps", "[0, 1]"),
    ({"attack": {"eps": -0.1}}, "attack.eps", "[0, 1]"),
    ({"attack": {"steps": -1}}, "attack.steps", ">= 0"),
    ({"train": {"method": "pgd"}}, "train.method", "spat_at"),
    ({"model": {"name": "resnet50"}}, "model.name", "preact_resnet18"),
    ({"train": {"batch_size": 0}}, "train.batch_size", ">= 1"),
    ({"train": {"epochs": "ten"}}, "train.epochs", "integer"),
    ({"train": {"compile": "yes"}}, "train.compile", "true or false"),
    ({"attack": {"rule": "union"}}, "attack.rule", "intersection"),
    ({"attack": {"classes": "top10"}}, "attack.classes", "topk:N"),
    ({"eval": {"suite": ["pgd20", "apgd"]}}, "eval.suite", "autoattack"),
    ({"data": {"name": "npz"}}, "data.path", "npz"),
    ({"attack": {"rule": "agreement", "saliency": "cam"}}, "attack.rule", "input_grad"),
    ({"attack": {"budget": "ball"}}, "attack.budget", "step, radius"),
    ({"attack": {"budget": "radius", "rule": "none"}}, "attack.budget", "intersection"),
    ({"attack": {"radius_mean": 0}}, "attack.radius_mean", "(0, 1]"),
    ({"attack": {"radius_mean": 1.2}}, "attack.radius_mean", "(0, 1]"),
])
def test_bad_values_name_key_and_allowed_values(data, key, allowed):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert key in str(e.value) and allowed in str(e.value)


def test_overrides_are_validated_like_the_file(tmp_path):
    cfg = load_config(None, ["train.lr=0.05", "attack.eps=16/255", "data.name=synthetic"])
    assert cfg.train.lr == 0.05 and format_eps(cfg.attack.eps) == "16/255"
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(None, ["train.lrr=0.05"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_experiment_expands_variants_datasets_and_seeds(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({
        "experiment": "demo",
        "base": {"train": {"epochs": 2}, "attack": {"eps": "0.1"}},
        "variants": {"pgd_at": {"train": {"method": "pgd_at"}},
                     "spat_random": {"train": {"method": "spat_at"}, "attack": {"rule": "random"}}},
        "seeds": [0, 1],
        "datasets": ["digits", "synthetic"],
        "hypothesis": {"eps_list": [0.1]},
    }))
    exp = load_experiment(p, ["train.epochs=3", "hypothesis.n_examples=50"])
    assert exp.name == "demo" and len(exp.runs) == 8
    run = exp.runs["spat_random-synthetic-s1"]
    assert (run.seed, run.data.name, run.attack.rule, run.train.epochs) == (1, "synthetic", "random", 3)
    assert exp.hypothesis == {"eps_list": [0.1], "n_examples": 50}


def test_experiment_typo_in_a_variant_names_run_and_key(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("variants:\n  a: {train: {methd: pgd_at}}\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(p)
    assert "train.methd" in str(e.value) and "run 'a-digits-s0'" in str(e.value)
    p.write_text("variant:\n  a: {}\n")
    with pytest.raises(ConfigError, match="did you mean 'variants'"):
        load_experiment(p)


def test_run_names_follow_a_data_name_override():
    exp = load_experiment_text("variants: {a: {}}\ndatasets: [digits]\n", ["data.name=synthetic"])
    assert list(exp.runs) == ["a-synthetic-s0"]
    run = exp.runs["a-synthetic-s0"]
    assert run.name == "a-synthetic-s0" and run.data.name == "synthetic"
    assert exp.labels == {"a-synthetic-s0": {"variant": "a", "dataset": "synthetic", "seed": 0}}
    # an override to npz keeps the label: the file holds the data the experiment names
    exp = load_experiment_text("variants: {a: {}}\ndatasets: [cifar10]\n",
                               ["data.name=npz", "data.path=/x.npz"])
    assert list(exp.runs) == ["a-cifar10-s0"] and exp.runs["a-cifar10-s0"].data.name == "npz"
    # no override: a datasets label names the run
    exp = load_experiment_text("variants: {a: {}}\ndatasets: {prefix: {name: synthetic}}\n")
    assert list(exp.runs) == ["a-prefix-s0"] and exp.runs["a-prefix-s0"].data.name == "synthetic"


def test_range_checks_sit_beside_their_fields_and_are_checked_at_import():
    import dataclasses

    from spatlib import config
    checked = {f"{cls.__name__}.{f.name}" for cls in (config.TrainConfig, config.AttackConfig)
               for f in dataclasses.fields(cls) if "check" in f.metadata}
    assert {"TrainConfig.lr", "TrainConfig.epochs", "AttackConfig.eps", "AttackConfig.rule"} <= checked

    @dataclasses.dataclass
    class Bad:
        steps: int = config.spec(0, config.POSITIVE_INT)   # a default outside its own range

    with pytest.raises(TypeError, match="Bad.steps: default 0 fails its own check"):
        config._check_declarations((Bad,))


def load_experiment_text(text, overrides=None):
    return expand_experiment(yaml.safe_load(text), overrides)
