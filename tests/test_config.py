import pytest

from sdesbench.config import RunConfig
from sdesbench.engine.configure import build_config
from sdesbench.errors import ConfigError


def test_defaults_follow_the_paper_protocol():
    cfg = build_config({})
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay, cfg.train.poly_power) == (0.01, 0.9, 1e-4, 0.9)
    assert cfg.method.name == "student" and cfg.data.name == "tiny"


def test_yaml_mapping_and_overrides():
    cfg = build_config({"train": {"iters": 10}, "data": {"crop": 32}}, ["train.iters=200", "train.lr=0.02",
                                                                      "model.name=deeplabv3_resnet50"])
    assert cfg.train.iters == 200 and cfg.train.lr == 0.02 and cfg.data.crop == [32, 32]
    assert cfg.model.name == "deeplabv3_resnet50"


def test_method_options_route_to_method():
    cfg = build_config({"method": {"name": "student", "aux_weight": 0.2}}, ["method.aux_weight=0.3"])
    assert cfg.method.options == {"aux_weight": 0.3}


@pytest.mark.parametrize("data,overrides,needle", [
    ({"train": {"iterz": 5}}, [], "unknown config key 'train.iterz' (did you mean 'train.iters'?)"),
    ({}, ["train.iters=-5"], "train.iters=-5 is out of range"),
    ({}, ["train.iters=abc"], "train.iters: expected an integer"),
    ({}, ["train.lr=true"], "train.lr: expected a number"),
    ({}, ["model.name=no_such_model"], "unknown model 'no_such_model'"),
    ({}, ["method.name=no_such_method"], "unknown method 'no_such_method'"),
    ({}, ["data.name=no_such_dataset"], "unknown dataset 'no_such_dataset'"),
    ({}, ["method.nonsense=1"], "unknown config key 'method.nonsense'"),
    ({}, ["data.batch_size=0"], "data.batch_size=0 is out of range"),
    ({}, ["train.amp=fp8"], "train.amp must be"),
    ({}, ["trainiters"], "--set expects section.key=value"),
])
def test_bad_config_gives_one_clear_error(data, overrides, needle):
    with pytest.raises(ConfigError) as e:
        build_config(data, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_identity_hash_ignores_output_and_logging_only():
    a = build_config({}, ["output.dir=/tmp/a", "train.log_every=3"])
    b = build_config({}, ["output.dir=/tmp/b"])
    c = build_config({}, ["train.seed=1"])
    assert a.identity_hash() == b.identity_hash() != c.identity_hash()
    assert isinstance(build_config({}).identity_hash(), str)
