import pytest

from act.config import load_config, validate_config
from act.errors import ConfigError, ModelError
from conftest import tiny_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(raw=tiny_config(tmp_path), overrides=["train.lr=0.5", "data.augment=false", "quant.skip=[model.0.*]"])
    assert cfg.train.lr == 0.5 and cfg.data.augmentation is None and cfg.quant.skip == ["model.0.*"]
    assert cfg.quant.activation.ema_rate == 0.9 and cfg.quant.activation.pact
    assert cfg.distill.losses["box"].type == "soft_label" and cfg.distill.losses["box"].axis == "dfl"


def test_overrides_index_the_stages_list(tmp_path):
    raw = tiny_config(tmp_path, stages=[{"type": "prune"}, {"type": "quant"}])
    cfg = load_config(raw=raw, overrides=["stages.0.keep_branches=[kpt]", "stages.0.target=0.5",
                                          "stages.1.train.iterations=7"])
    assert cfg.stages[0].keep_branches == ["kpt"] and cfg.stages[0].target == 0.5
    assert cfg.stages[1].train.iterations == 7 and cfg.stages[1].type == "quant"
    with pytest.raises(ConfigError, match="stages.2: expected an index below 2"):
        load_config(raw=raw, overrides=["stages.2.target=0.5"])
    with pytest.raises(ConfigError, match="stages.0.prune.targt: unknown key"):  # then validated as usual
        load_config(raw=raw, overrides=["stages.0.targt=0.5"])


@pytest.mark.parametrize(
    "override, path",
    [
        ("train.lr=-1", "train.lr"),
        ("train.optimizer=lion", "train.optimizer"),
        ("data.imgsz=100", "data.imgsz"),
        ("quant.activation.ema_rate=1.5", "quant.activation.ema_rate"),
        ("quant.activaton.pact=false", "quant.activaton"),
        ("distill.losses.box.type=huber", "distill.losses.box.type"),
        ("eval.callback=nocolon", "eval.callback"),
        ("bogus=1", "bogus"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, path):
    with pytest.raises(ConfigError) as e:
        load_config(raw=tiny_config(tmp_path), overrides=[override])
    assert path in str(e.value) and e.value.exit_code == 2


def test_missing_section_and_files(tmp_path):
    with pytest.raises(ConfigError, match="model: missing required key"):
        validate_config({"data": {"train": "x"}})
    with pytest.raises(ConfigError, match="data.train"):
        load_config(raw=tiny_config(tmp_path, data={"train": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="eval.data"):
        load_config(raw=tiny_config(tmp_path, eval={"data": str(tmp_path / "missing.yaml")}))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_teacher_resolution(tmp_path):
    from teachers import resolve_teacher

    assert resolve_teacher("yolo11n-pose").path.name == "yolo11n-pose.pt"
    with pytest.raises(ModelError, match="act never downloads.*weights/yolov8s-pose.pt"):
        resolve_teacher("yolov8s-pose")
    with pytest.raises(ModelError, match="unknown teacher"):
        resolve_teacher("yolo99x")
    assert resolve_teacher("yolov8n-pose.yaml").kind == "yaml"
