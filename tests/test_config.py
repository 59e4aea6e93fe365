"""Every default in one place: the schema fills the config, the library agrees with it, the rules
read config[...] without defaults of their own, and the schema lists what the registries list."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml
from snakemake.utils import validate
from workflow_runner import REPO

from lungreg.classify.cnn import CnnSettings
from lungreg.classify.tabular import sklearn_classifier
from lungreg.config import settings_from
from lungreg.lungmask import AutoMaskSettings
from lungreg.network.losses import LossSettings
from lungreg.network.model import Acceleration, ModelSettings
from lungreg.network.refine import RefineSettings
from lungreg.network.train import TrainSettings
from lungreg.preprocess import PreprocessSettings
from lungreg.registration.baselines.registrar import OPTIONS, resolve_options
from lungreg.registration.network import NetworkRegistrar
from lungreg.study import (
    BASELINE_METHODS,
    CLASSIFIERS,
    FIELD_SOURCES,
    NETWORK_VARIANTS,
    PREPROCESS_WORKFLOW_KEYS,
    REFINE_WORKFLOW_KEYS,
    REGIONAL_CLASSIFIERS,
    SplitSettings,
    protocol_pairs,
    split_subjects,
)
from lungreg.synthetic.settings import SyntheticCohortSettings

SCHEMA = REPO / "config" / "schemas" / "config.schema.yaml"
WORKFLOW_KEYS = ("enabled", "protocols", "chunks", "subjects")  # of a baseline section; the rest goes to the method


def effective(config: dict) -> dict:
    """`config` as the rules see it: validated, the schema's defaults filled in."""
    validate(config, str(SCHEMA))
    return config


@pytest.fixture(scope="module")
def config() -> dict:
    return effective(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))


@pytest.fixture(scope="module")
def schema_defaults() -> dict:
    """config.yaml less the study's choices of keys the library has a default for: what the schema
    fills in is then every default (config.yaml keeps only the keys without one)."""
    study = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for section, cls in (("model", ModelSettings), ("loss", LossSettings), ("train", TrainSettings)):
        study[section] = {k: v for k, v in study[section].items() if k not in library_defaults(cls)}
    return effective(study)


def library_defaults(cls) -> dict:
    """The defaults a settings dataclass keeps itself (fields without one are not listed)."""
    defaults = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def assert_library_agrees(cls, section: dict, given: dict | None = None) -> None:
    """The library builds `cls` from the section, and every default it keeps is the schema's."""
    settings_from(cls, section, cls.__name__, **(given or {}))
    differing = {
        name: (value, section[name])
        for name, value in library_defaults(cls).items()
        if name in section and value != section[name]
    }
    assert not differing, f"{cls.__name__}: library default != workflow default: {differing}"


def test_the_library_keeps_no_default_the_schema_does_not_have(schema_defaults):
    config = schema_defaults
    assert SyntheticCohortSettings.from_config(config["synthetic"]) == SyntheticCohortSettings()
    preprocess = {k: v for k, v in config["preprocess"].items() if k not in PREPROCESS_WORKFLOW_KEYS}
    assert_library_agrees(PreprocessSettings, preprocess, {"reference_phase": config["pairs"]["fixed_phase"]})
    assert_library_agrees(AutoMaskSettings, config["preprocess"]["auto_mask"])
    assert set(config["preprocess"]["auto_mask"]) == set(library_defaults(AutoMaskSettings))
    assert_library_agrees(SplitSettings, config["split"])
    assert library_defaults(PreprocessSettings)["reference_phase"] == config["pairs"]["fixed_phase"]
    assert_library_agrees(ModelSettings, config["model"])
    assert_library_agrees(LossSettings, config["loss"])
    assert_library_agrees(TrainSettings, config["train"])
    assert_library_agrees(CnnSettings, config["classify"]["cnn"])
    refine = {k: v for k, v in config["refine"].items() if k not in REFINE_WORKFLOW_KEYS}  # protocols, budget_curve
    assert RefineSettings.from_config(refine) == RefineSettings()  # the stages too
    for section in ("train", "inference"):
        assert Acceleration.from_config(config[section]) == Acceleration()
    for method, options in OPTIONS.items():
        section = {k: v for k, v in config["baselines"][method].items() if k not in WORKFLOW_KEYS}
        assert set(section) == set(library_defaults(options)), method  # every option has its schema default
        assert_library_agrees(options, section)
        assert resolve_options(method, section) == resolve_options(method, {}), method
    for name in REGIONAL_CLASSIFIERS:  # the schema's estimator options change nothing
        ours, library = sklearn_classifier(name, config["classify"][name], 0), sklearn_classifier(name, {}, 0)
        assert [type(step) for step in ours] == [type(step) for step in library], name
        assert ours[-1].get_params() == library[-1].get_params(), name


def test_the_library_functions_default_to_the_schema_where_they_take_a_config_value(config):
    def default(function, name):
        return inspect.signature(function).parameters[name].default

    assert default(split_subjects, "min_subjects") == config["split"]["min_subjects"]
    assert default(protocol_pairs, "fixed_phase") == config["pairs"]["fixed_phase"]
    for name in ("device", "batch_size", "prefetch"):
        assert default(NetworkRegistrar.__init__, name) == config["inference"][name], name


def test_the_knobs_of_the_paper_versus_this_study_have_no_library_default():
    required = {
        cls: [f.name for f in dataclasses.fields(cls) if f.name not in library_defaults(cls)]
        for cls in (ModelSettings, LossSettings, TrainSettings)
    }
    assert required == {ModelSettings: ["width"], LossSettings: ["beta", "mask_weighted"], TrainSettings: ["epochs"]}


def test_validate_fills_nested_sections_and_defaults_beside_a_ref():
    minimal = {
        "subjects": None,
        "preprocess": {"intensity_range": [0, 1], "factor": 1, "grid_shape": [8, 8, 8]},
        "split": {"validation_fraction": 0.25},
        "network": {"variants": ["proposed"]},
        "model": {"width": 1},
        "loss": {"beta": 1e-6, "mask_weighted": False},
        "train": {"epochs": 1},
        "inference": {
            "protocols": ["inhale_exhale"],
            "chunks": {"inhale_exhale": 1, "all_combinations": 1, "cohort": 1},
        },
        "threads": {"gpu_jobs": 1, "baselines": 1},
        "baselines": {m: {"enabled": False} for m in BASELINE_METHODS},
        "classify": {"classifiers": ["cnn"]},
    }
    config = effective(minimal)
    assert config["network"]["training_pairs"] == {"both_directions": False, "inter_patient": False}
    assert config["train"]["compile"] is False and config["inference"]["compile"] is False  # default beside $ref
    assert config["baselines"]["syn"]["syn_iterations"] == [40, 20, 10]  # its own properties
    assert config["baselines"]["syn"]["crop_margin_mm"] == 20.0  # the shared ones, through $ref
    assert config["baselines"]["sitk_demons"]["linear_iterations"] == 200  # both $refs
    assert config["classify"]["cnn"]["epochs"] == 150 and config["report"] == {"method": "auto", "subjects": 3}
    assert config["classify"]["method"] == "auto" and config["classify"]["sources"] == "auto"  # resolved by the rules
    assert config["synthetic"]["n_subjects"] == 41 and config["pairs"]["fixed_phase"] == "exhale"
    assert config["split"]["n_validation"] is None and config["preprocess"]["max_mask_crop"] == 0.01


def test_the_default_split_is_the_papers_13_of_41_and_scales_with_the_cohort(config):
    split = SplitSettings.from_config(config["split"])
    assert split.n_validation_for(config["synthetic"]["n_subjects"]) == 13  # the paper's 28 + 13
    assert split.n_validation_for(16) == 5  # 11 train (13 of 16 would leave 3)
    assert split.n_validation_for(10) == 10 - split.min_training  # the floor on training subjects
    assert split.n_validation_for(split.min_training) == 0  # then no split: train and evaluate on all
    explicit = SplitSettings.from_config({**config["split"], "n_validation": 13})
    assert explicit.n_validation_for(16) == 13 and explicit.n_validation_for(13) == 0
    assert "5 validation and 11 training subjects" in split.describe(16)


def test_the_default_grid_of_the_synthetic_cohort_is_its_field_of_view(config):
    """grid_shape: auto leaves the synthetic default study as it was (24 x 48 x 48 at 2/3)."""
    assert config["preprocess"]["grid_shape"] == "auto"
    synthetic = SyntheticCohortSettings.from_config(config["synthetic"])
    assert synthetic.covering_shape(config["preprocess"]["factor"]) == (24, 48, 48)
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    scaled = SyntheticCohortSettings.from_config({**config["synthetic"], **paper["synthetic"]})
    assert scaled.covering_shape(paper["preprocess"]["factor"]) == tuple(paper["preprocess"]["grid_shape"])


def test_the_ct_preset_validates_and_sets_a_ct_window_and_the_auto_grid(config):
    ct = yaml.safe_load((REPO / "config" / "ct.yaml").read_text())
    merged = effective({k: ({**config[k], **v} if isinstance(v, dict) else v) for k, v in {**config, **ct}.items()})
    assert merged["preprocess"]["grid_shape"] == "auto" and merged["preprocess"]["intensity_range"][0] <= -1000
    preprocess = {k: v for k, v in merged["preprocess"].items() if k not in PREPROCESS_WORKFLOW_KEYS}
    PreprocessSettings.from_config(preprocess, "exhale")


def test_the_bending_refinement_preset_validates_and_changes_only_the_regularisers(config):
    preset = yaml.safe_load((REPO / "config" / "refine_bending.yaml").read_text())
    merged = effective({**config, "refine": {**config["refine"], **preset["refine"]}})["refine"]
    bending = RefineSettings.from_config({k: v for k, v in merged.items() if k not in REFINE_WORKFLOW_KEYS})
    default = RefineSettings()
    assert [s.bending > 0 and s.diffusion == 0 for s in bending.stages] == [True, True]
    strip = lambda stages: [dataclasses.replace(s, diffusion=0.0, bending=0.0) for s in stages]  # noqa: E731
    assert strip(bending.stages) == strip(default.stages)


def test_settings_from_refuses_unknown_and_missing_keys_in_one_message():
    with pytest.raises(ValueError, match=r"^train: unknown key\(s\) epoch .*known keys: .*epochs"):
        settings_from(TrainSettings, {"epoch": 3}, "train")
    with pytest.raises(ValueError, match=r"^loss lacks: beta, mask_weighted$"):
        settings_from(LossSettings, {}, "loss")


def test_the_rules_take_no_default_of_their_own():
    """Defaults live in the schema: no `.get(key, default)` on the config in the rules."""
    found = []
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if ".get(" in line and "os.environ.get(" not in line:
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_schema_lists_what_the_registries_list():
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]
    assert schema["network"]["properties"]["variants"]["items"]["enum"] == list(NETWORK_VARIANTS)
    assert schema["classify"]["properties"]["method"]["oneOf"][0]["enum"] == list(FIELD_SOURCES)
    assert schema["classify"]["properties"]["classifiers"]["items"]["enum"] == [c.name for c in CLASSIFIERS]
    assert list(schema["baselines"]["properties"]) == list(BASELINE_METHODS) == list(OPTIONS)
