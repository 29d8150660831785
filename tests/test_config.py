import pytest

from act.core.config import load_config, validate_config
from act.core.errors import ConfigError, ModelError
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
    with pytest.raises(ConfigError, match="stages.0.targt: unknown key"):  # then validated as usual
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
    from act.run.build import check_inputs  # (a run checks the files its config names before any work)

    with pytest.raises(ConfigError, match="data.train"):
        check_inputs(load_config(raw=tiny_config(tmp_path, data={"train": str(tmp_path / "nowhere")})))
    with pytest.raises(ConfigError, match="eval.data"):
        check_inputs(load_config(raw=tiny_config(tmp_path, eval={"data": str(tmp_path / "missing.yaml")})))
    with pytest.raises(ModelError, match="model.teacher"):
        check_inputs(load_config(raw=tiny_config(tmp_path, model={"teacher": str(tmp_path / "missing.pt")})))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_teacher_resolution(tmp_path):
    from teachers import resolve_teacher

    assert resolve_teacher("yolo11n-pose").path.name == "yolo11n-pose.pt"
    with pytest.raises(ModelError, match="offline: YOLO_OFFLINE is set.*weights/yolov8s-pose.pt"):
        resolve_teacher("yolov8s-pose")
    with pytest.raises(ModelError, match="unknown teacher"):
        resolve_teacher("yolo99x")
    assert resolve_teacher("yolov8n-pose.yaml").kind == "yaml"


def test_a_registered_teacher_not_on_disk_is_fetched_by_its_family_unless_offline(tmp_path, monkeypatch):
    """Online, a registered name not on disk goes through the family's own download (Ultralytics' asset download);
    with YOLO_OFFLINE set by the user it is never attempted and the message says why."""
    import act
    from act.core.family import family_named
    from teachers import resolve_teacher

    fam = family_named("ultralytics-yolo")
    calls = []

    def fake_fetch(file, folder):
        calls.append((file, str(folder)))
        path = tmp_path / "w" / file
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
        return path

    monkeypatch.setattr(type(fam), "fetch_weights", lambda self, file, folder: fake_fetch(file, folder))
    monkeypatch.setenv("ACT_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(act, "USER_OFFLINE", True)
    with pytest.raises(ModelError, match="offline: YOLO_OFFLINE is set"):
        resolve_teacher("yolov8s-pose")
    assert calls == []
    monkeypatch.setattr(act, "USER_OFFLINE", False)
    src = resolve_teacher("yolov8s-pose")
    assert calls == [("yolov8s-pose.pt", str(tmp_path / "w"))] and src.path == tmp_path / "w" / "yolov8s-pose.pt"
    assert src.kind == "pt" and src.family == "ultralytics-yolo"


def test_without_network_the_family_fetch_gives_up_quietly(tmp_path, monkeypatch):
    """No network (this machine): Ultralytics' online check fails fast, nothing is written, the message stays."""
    import act
    from teachers import resolve_teacher

    monkeypatch.setattr(act, "USER_OFFLINE", False)
    monkeypatch.setenv("ACT_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ultralytics.utils.is_online", lambda: False)
    with pytest.raises(ModelError, match="could not download it.*yolov8s-pose.pt"):
        resolve_teacher("yolov8s-pose")
    assert not (tmp_path / "w" / "yolov8s-pose.pt").exists()
