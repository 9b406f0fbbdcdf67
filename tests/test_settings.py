"""Settings declared once (nnrelief.settings): checks, choices, key suggestions, docs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nnrelief.experiments.config import ConfigError, ExperimentConfig, resolve_config, run_name
from nnrelief.settings import check_fields, check_keys, document, in_interval, like, setting, specs, suggestion
from nnrelief.training import TrainConfig


@document
@dataclass
class Example:
    """An example."""

    rate: float = setting(0.5, help="a rate", range="(0, 1]")
    mode: str = setting("fast", help="how", choices=("fast", "Slow"))
    sizes: list[int] = setting(factory=list, help="sizes", range="[1, inf)")


@dataclass
class Other:
    """The same rate with another default."""

    rate: float = like(Example, "rate", 1.0, help="another rate")


def test_check_fields_reads_range_and_choices():
    example = Example(mode="SLOW")
    check_fields(example)
    assert example.mode == "Slow"
    for bad, needle in [
        ({"rate": 0.0}, r"rate must be in \(0, 1\], got 0.0"),
        ({"rate": float("nan")}, "rate must be a finite number"),
        ({"mode": "fats"}, r"mode must be one of \('fast', 'Slow'\), got 'fats' \(did you mean fast\?\)"),
        ({"sizes": [1, 0]}, r"sizes entries must be in \[1, inf\), got \[1, 0\]"),
    ]:
        with pytest.raises(ValueError, match=needle):
            check_fields(Example(**bad))


def test_like_copies_the_declaration_with_its_own_default_and_help():
    assert Other().rate == 1.0
    assert specs(Other)["rate"].range == "(0, 1]" and specs(Other)["rate"].help == "another rate"


def test_document_writes_the_attributes_from_the_declarations():
    assert "rate: a rate; in (0, 1]." in Example.__doc__
    assert "mode: how; one of fast, Slow." in Example.__doc__
    assert "optimizer: adam, sgd or adamw." in TrainConfig.__doc__


@pytest.mark.parametrize("interval", ["0, 1", "(0; 1]", "(0, 1, 2]"])
def test_a_malformed_interval_fails_where_it_is_declared(interval):
    with pytest.raises(ValueError, match="must look like"):
        setting(0.5, help="x", range=interval)


def test_intervals():
    assert in_interval(1.0, "(0, 1]") and not in_interval(0.0, "(0, 1]") and in_interval(0.0, "[0, inf)")
    assert not in_interval(float("inf"), "[0, inf)")


def test_suggestions_prefer_the_word_typed_so_far():
    assert suggestion("resnet2", ["resnet32", "resnet20"]) == " (did you mean resnet20?)"
    assert suggestion("retrain-epochs", ["epochs", "retrain_epochs"], lambda k: k.replace("-", "_")) == (
        " (did you mean retrain_epochs?)"
    )
    assert suggestion("zzz", ["epochs"]) == ""
    with pytest.raises(ValueError, match=r"exp.toml: unknown setting\(s\) \['epoch'\] \(did you mean epochs\?\); valid: epochs"):
        check_keys({"epoch": 1}, ["epochs"], "exp.toml")


def test_choices_are_normalised_before_the_folder_hash(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('preset = "resnet20-cifar10"\noptimizer = "SGD"\nscore = "Authors"\n')
    from_file = run_name(*resolve_config(config_file=path))
    assert from_file == run_name(*resolve_config("resnet20-cifar10", overrides={"score": "authors"}))
    assert ExperimentConfig(optimizer="AdamW").optimizer == "adamw"
    with pytest.raises(ConfigError, match=r"setting score must be one of \('paper', 'authors'\), got 'paperr'"):
        ExperimentConfig(score="paperr")
